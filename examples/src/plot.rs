//! The optional plot of a run: devices online and converged, and reports queued on the
//! agents, over the timeline (SVG, one file, no fonts needed to write it).

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

use crate::report::Report;

/// Writes the timeline of `report` to `path` as SVG.
pub fn write_svg(report: &Report, path: &Path) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", path.display());
    let t_max = report
        .timeline
        .last()
        .map_or(1.0, |s| (s.t_ms as f64 / 1000.0).max(1.0));
    let y_max = report.devices.max(1) as f64 * 1.05;
    let q_max = report
        .timeline
        .iter()
        .map(|s| s.queued)
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let root = SVGBackend::new(path, (1000, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "fleet-sim: {} ({} devices, {} mode)",
                report.scenario, report.devices, report.mode
            ),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .right_y_label_area_size(70)
        .build_cartesian_2d(0.0..t_max, 0.0..y_max)
        .map_err(|e| err(&e))?
        .set_secondary_coord(0.0..t_max, 0.0..q_max * 1.05);
    chart
        .configure_mesh()
        .x_desc("seconds into the timeline")
        .y_desc("devices")
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .configure_secondary_axes()
        .y_desc("queued reports")
        .draw()
        .map_err(|e| err(&e))?;
    let series = |f: fn(&crate::report::Sample) -> f64| {
        report
            .timeline
            .iter()
            .map(move |s| (s.t_ms as f64 / 1000.0, f(s)))
    };
    chart
        .draw_series(LineSeries::new(
            series(|s| s.online as f64),
            BLUE.stroke_width(2),
        ))
        .map_err(|e| err(&e))?
        .label("online")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    chart
        .draw_series(LineSeries::new(
            series(|s| s.converged as f64),
            GREEN.stroke_width(2),
        ))
        .map_err(|e| err(&e))?
        .label("converged")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREEN));
    chart
        .draw_secondary_series(LineSeries::new(series(|s| s.queued as f64), RED))
        .map_err(|e| err(&e))?
        .label("queued reports (right axis)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Sample;

    #[test]
    fn writes_an_svg_with_the_three_series() {
        let mut r = Report {
            scenario: "t".into(),
            mode: "real".into(),
            devices: 10,
            ..Default::default()
        };
        for i in 0..20u64 {
            r.timeline.push(Sample {
                t_ms: i * 500,
                online: (i as usize).min(10),
                converged: (i as usize / 2).min(10),
                queued: 20 - i,
                ..Sample::default()
            });
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.svg");
        write_svg(&r, &p).unwrap();
        let svg = std::fs::read_to_string(&p).unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("converged") && svg.contains("queued reports"));
        assert!(svg.matches("<polyline").count() >= 3, "{svg}");
    }
}

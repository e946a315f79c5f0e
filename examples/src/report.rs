//! What a fleet-simulation run reports, in either mode: per-phase convergence
//! percentiles, bytes on the wire, events delivered, the hub's CPU and memory, the
//! invariants checked, and a timeline of online/converged devices for the plot.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::scenario::Invariant;

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Report {
    pub scenario: String,
    /// `real` or `deterministic`.
    pub mode: String,
    pub seed: u64,
    pub devices: usize,
    /// Wall-clock seconds the run took (enrollment included).
    pub wall_secs: f64,
    /// Seconds of simulated time (deterministic mode) or of the timeline (real mode).
    pub simulated_secs: f64,
    pub phases: Vec<Phase>,
    pub wire: Wire,
    pub events: Events,
    pub faults: Faults,
    /// The hub process's usage (real mode only).
    pub hub: Option<HubUsage>,
    pub invariants: Vec<InvariantResult>,
    /// Individual findings behind failed invariants (at most a few hundred).
    pub problems: Vec<String>,
    /// Fleet counts over time, one sample per tick of the progress display.
    pub timeline: Vec<Sample>,
    /// How long the hub's admin API took for each operator action (real mode).
    #[serde(default)]
    pub actions: Vec<Action>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Action {
    pub what: String,
    pub ms: u64,
}

/// One `converge` step: how long each device took.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Phase {
    pub name: String,
    /// Devices that had to converge (those not cut off).
    pub devices: usize,
    pub converged: usize,
    pub p50_ms: u64,
    pub p90_ms: u64,
    pub p99_ms: u64,
    pub max_ms: u64,
    /// CPU seconds the hub used from the action (or fault) this phase measures until
    /// everything converged (real mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub_cpu_secs: Option<f64>,
}

impl Phase {
    /// A phase from per-device convergence times in milliseconds (any order).
    pub fn from_times(name: &str, devices: usize, mut times: Vec<u64>) -> Self {
        times.sort_unstable();
        Phase {
            name: name.into(),
            devices,
            converged: times.len(),
            p50_ms: percentile(&times, 0.50),
            p90_ms: percentile(&times, 0.90),
            p99_ms: percentile(&times, 0.99),
            max_ms: times.last().copied().unwrap_or(0),
            hub_cpu_secs: None,
        }
    }
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((sorted.len() as f64) * p).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Bytes on the wire. Real mode counts UDP payload bytes of the hub's QUIC endpoint
/// (handshakes, TLS, retransmits and acks included); deterministic mode counts protocol
/// frame bytes (what QUIC would carry, without its own overhead).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Wire {
    /// What the counts include.
    pub counted: String,
    pub to_hub: u64,
    pub from_hub: u64,
    pub per_device: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Events {
    /// Reports the agents numbered (events and status).
    pub created: u64,
    /// Reports stored at the hub.
    pub delivered: u64,
    /// Reports numbered by an agent and never stored at the hub.
    pub lost: u64,
    /// Reports stored at the hub more than once.
    pub duplicated: u64,
    /// Of the delivered events, `drift-corrected` ones.
    pub drift_corrected: u64,
    /// Times the hub quarantined a device (its `hub.quarantined` events).
    #[serde(default)]
    pub quarantined: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Faults {
    pub partitions: u64,
    pub flaps: u64,
    pub agent_crashes: u64,
    pub hub_restarts: u64,
    /// Boxes rebooted into a boot image they were not enrolled with.
    #[serde(default)]
    pub tampered: u64,
    /// Sessions established, first connections included (deterministic mode only: the
    /// real hub does not record sessions).
    pub sessions: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct HubUsage {
    /// CPU seconds (user + system) of the hub process over the run.
    pub cpu_secs: f64,
    /// Mean share of one core while the timeline ran.
    pub cpu_percent: f64,
    pub rss_peak_mb: f64,
    pub rss_end_mb: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InvariantResult {
    pub invariant: Invariant,
    pub description: String,
    pub ok: bool,
    /// What was counted, e.g. "1999 of 2000 devices".
    pub detail: String,
}

impl InvariantResult {
    pub fn new(invariant: Invariant, ok: bool, detail: impl Into<String>) -> Self {
        Self {
            invariant,
            description: invariant.describe().into(),
            ok,
            detail: detail.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, Default)]
pub struct Sample {
    /// Milliseconds since the timeline started (simulated in deterministic mode).
    pub t_ms: u64,
    pub online: usize,
    pub converged: usize,
    /// Reports waiting in agents' outboxes.
    pub queued: u64,
    /// CPU seconds the hub process(es) used so far (real mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hub_cpu_secs: Option<f64>,
    /// The hub process's resident memory (real mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hub_rss_mb: Option<f64>,
}

impl Report {
    /// Every invariant held and every `converge` step converged all its devices in time.
    pub fn passed(&self) -> bool {
        self.invariants.iter().all(|i| i.ok) && self.phases.iter().all(|p| p.converged == p.devices)
    }

    /// The human-readable report.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "fleet simulation: scenario {:?}, {} devices, {} mode, seed {}",
            self.scenario, self.devices, self.mode, self.seed
        );
        let _ = writeln!(
            s,
            "ran {:.1} s of wall time for {:.1} s of timeline{}",
            self.wall_secs,
            self.simulated_secs,
            if self.mode == "deterministic" && self.wall_secs > 0.0 {
                format!(
                    " ({:.0} device-seconds per wall second)",
                    self.devices as f64 * self.simulated_secs / self.wall_secs
                )
            } else {
                String::new()
            }
        );
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "{:<32} {:>8} {:>10} {:>8} {:>8} {:>8} {:>8}",
            "phase", "devices", "converged", "p50 ms", "p90 ms", "p99 ms", "max ms"
        );
        for p in &self.phases {
            let _ = writeln!(
                s,
                "{:<32} {:>8} {:>10} {:>8} {:>8} {:>8} {:>8}",
                p.name, p.devices, p.converged, p.p50_ms, p.p90_ms, p.p99_ms, p.max_ms
            );
        }
        for a in &self.actions {
            let _ = writeln!(s, "admin API: {} took {} ms", a.what, a.ms);
        }
        if self.phases.iter().any(|p| p.hub_cpu_secs.is_some()) {
            let cpu: Vec<String> = self
                .phases
                .iter()
                .map(|p| format!("{:.1}", p.hub_cpu_secs.unwrap_or(0.0)))
                .collect();
            let _ = writeln!(s, "hub CPU-s per phase: {}", cpu.join(", "));
        }
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "wire: {} B to the hub, {} B from it, {} B per device ({})",
            self.wire.to_hub, self.wire.from_hub, self.wire.per_device, self.wire.counted
        );
        let e = &self.events;
        let _ = writeln!(
            s,
            "reports: {} numbered by agents, {} stored at the hub ({} drift-corrected), {} lost, {} duplicated{}",
            e.created,
            e.delivered,
            e.drift_corrected,
            e.lost,
            e.duplicated,
            if e.quarantined > 0 {
                format!("; {} quarantined by the hub", e.quarantined)
            } else {
                String::new()
            }
        );
        let f = &self.faults;
        let _ = write!(
            s,
            "faults: {} partitioned, {} flapping, {} agent crashes, {} hub restarts",
            f.partitions, f.flaps, f.agent_crashes, f.hub_restarts
        );
        if f.tampered > 0 {
            let _ = write!(s, ", {} tampered boots", f.tampered);
        }
        if f.sessions > 0 {
            let _ = write!(s, "; {} sessions established", f.sessions);
        }
        let _ = writeln!(s);
        if let Some(h) = &self.hub {
            let _ = writeln!(
                s,
                "hub process: {:.1} CPU-s ({:.0}% of a core on average), RSS peak {:.0} MB, at the end {:.0} MB",
                h.cpu_secs, h.cpu_percent, h.rss_peak_mb, h.rss_end_mb
            );
        }
        let _ = writeln!(s);
        let _ = writeln!(s, "invariants:");
        for i in &self.invariants {
            let _ = writeln!(
                s,
                "  [{}] {} — {}",
                if i.ok { "ok" } else { "FAILED" },
                i.description,
                i.detail
            );
        }
        for p in self.problems.iter().take(20) {
            let _ = writeln!(s, "  problem: {p}");
        }
        if self.problems.len() > 20 {
            let _ = writeln!(s, "  … and {} more (see --json)", self.problems.len() - 20);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), 50);
        assert_eq!(percentile(&v, 0.99), 99);
        assert_eq!(percentile(&v, 1.0), 100);
        assert_eq!(percentile(&[7], 0.5), 7);
        assert_eq!(percentile(&[], 0.5), 0);
        let p = Phase::from_times("x", 3, vec![30, 10, 20]);
        assert_eq!((p.p50_ms, p.max_ms, p.converged), (20, 30, 3));
    }
}

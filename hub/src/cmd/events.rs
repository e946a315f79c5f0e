//! `cairn-hub events`: what agents reported and the hub recorded, optionally followed.

use cairn_hub::cli::{self, CliResult, Client};
use cairn_hub::store::EventRecord;
use clap::Args;

#[derive(Args)]
pub(crate) struct EventsArgs {
    /// Only this device's events.
    #[arg(long)]
    device: Option<String>,
    /// Only this kind, e.g. drift-corrected, applied, hub.enrolled.
    #[arg(long)]
    kind: Option<String>,
    /// Only events after this id.
    #[arg(long, default_value_t = 0)]
    after: u64,
    /// At most this many (without --follow).
    #[arg(long, default_value_t = 1000)]
    limit: usize,
    /// Keep printing new events as they arrive.
    #[arg(long, short)]
    follow: bool,
}

pub(crate) async fn run(client: &Client, a: EventsArgs, json: bool) -> CliResult<()> {
    let mut after = a.after;
    loop {
        let mut q = vec![("after", after.to_string()), ("limit", a.limit.to_string())];
        if let Some(d) = &a.device {
            q.push(("device", d.clone()));
        }
        if let Some(k) = &a.kind {
            q.push(("kind", k.clone()));
        }
        if a.follow {
            q.push(("wait_ms", "30000".into()));
        }
        let evs: Vec<EventRecord> = client.get_query("/v1/events", &q).await?;
        if let Some(last) = evs.last() {
            after = last.id;
        }
        if json {
            if a.follow {
                for e in &evs {
                    println!("{}", serde_json::to_string(e)?);
                }
            } else {
                cli::print_json(&evs)?;
            }
        } else {
            for e in &evs {
                cli::print_event(e);
            }
        }
        if !a.follow {
            return Ok(());
        }
    }
}

/// Percent-encodes a query value.
pub(crate) fn url_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

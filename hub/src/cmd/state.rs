//! `cairn-hub set`, `unset` and `labels`: the desired state of devices and selectors.

use std::path::PathBuf;

use base64::Engine;
use cairn_hub::api::FileSpec;
use cairn_hub::cli::{self, CliError, CliResult, Client, exit};
use cairn_hub::store::{AssignOutcome, LabelCount};
use clap::Args;

#[derive(Args)]
#[group(id = "target", required = true, multiple = false)]
pub(crate) struct TargetArgs {
    /// One device id.
    #[arg(long, group = "target")]
    pub(crate) device: Option<String>,
    /// Label selector: key=value, key!=value or key, comma-separated, all must hold.
    #[arg(long, group = "target")]
    pub(crate) selector: Option<String>,
}

#[derive(Args)]
pub(crate) struct SetArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// Resource name, e.g. motd.
    name: String,
    /// File path below the agent's files root, e.g. etc/motd.
    #[arg(long)]
    path: String,
    /// File content as text.
    #[arg(long, conflicts_with = "content_file")]
    content: Option<String>,
    /// Read the content from this local file.
    #[arg(long)]
    content_file: Option<PathBuf>,
    /// Permission bits in octal.
    #[arg(long, default_value = "644")]
    mode: String,
    /// Numeric owner.
    #[arg(long)]
    uid: Option<u32>,
    /// Numeric group.
    #[arg(long)]
    gid: Option<u32>,
}

#[derive(Args)]
pub(crate) struct UnsetArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// Resource name.
    name: String,
}

fn parse_mode(s: &str) -> CliResult<u32> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8).map_err(|_| CliError {
        code: exit::USAGE,
        error: anyhow::anyhow!("--mode {s:?} is not an octal number such as 644"),
    })
}

pub(crate) async fn set(client: &Client, a: SetArgs, json: bool) -> CliResult<()> {
    let content = match (&a.content, &a.content_file) {
        (_, Some(f)) => {
            std::fs::read(f).map_err(|e| anyhow::anyhow!("reading {}: {e}", f.display()))?
        }
        (Some(c), None) => c.clone().into_bytes(),
        (None, None) => Vec::new(),
    };
    let file = FileSpec {
        path: a.path,
        content: None,
        content_base64: Some(base64::engine::general_purpose::STANDARD.encode(content)),
        mode: parse_mode(&a.mode)?,
        uid: a.uid,
        gid: a.gid,
    };
    let body = cli::state_change(a.target.device, a.target.selector, &a.name, Some(file));
    print_outcome(client.post("/v1/state", &body).await?, json)?;
    Ok(())
}

pub(crate) async fn unset(client: &Client, a: UnsetArgs, json: bool) -> CliResult<()> {
    let body = cli::state_change(a.target.device, a.target.selector, &a.name, None);
    print_outcome(client.post("/v1/state", &body).await?, json)?;
    Ok(())
}

pub(crate) async fn labels(client: &Client, json: bool) -> CliResult<()> {
    let ls: Vec<LabelCount> = client.get("/v1/labels").await?;
    if json {
        cli::print_json(&ls)?;
    } else {
        let rows: Vec<Vec<String>> = ls
            .iter()
            .map(|l| vec![l.key.clone(), l.value.clone(), l.devices.to_string()])
            .collect();
        cli::print_table(&["KEY", "VALUE", "DEVICES"], &rows);
    }
    Ok(())
}

pub(crate) fn print_outcome(out: AssignOutcome, json: bool) -> CliResult<()> {
    if json {
        return cli::print_json(&out);
    }
    let (matched, changed) = (out.matched, out.changed.len());
    println!(
        "{matched} {} match; {changed} got a new signed revision and {} being updated",
        if matched == 1 { "device" } else { "devices" },
        if changed == 1 { "is" } else { "are" },
    );
    Ok(())
}

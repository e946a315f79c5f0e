//! `cairn-hub policy`: attestation policies.

use cairn_hub::api::Deleted;
use cairn_hub::attest::AttestPolicy;
use cairn_hub::cli::{self, CliError, CliResult, Client, exit};
use clap::Subcommand;

#[derive(Subcommand)]
pub(crate) enum PolicyCmd {
    /// List policies, first match first.
    Ls,
    /// Create or replace a policy. Devices matching no policy are attested and recorded
    /// but never quarantined for their measurements.
    ///
    /// Examples:
    ///   cairn-hub policy set kiosks --selector role=kiosk --require tpm --tofu
    ///   cairn-hub policy set lab --selector site=lab --pcrs 0-7,9 --golden 4=ab12…
    #[command(verbatim_doc_comment)]
    Set {
        /// Policy name (letters, digits, '-', '_', '.'); setting an existing name replaces it.
        name: String,
        /// Devices it applies to: key=value, key!=value or key, comma-separated.
        #[arg(long)]
        selector: String,
        /// Identity a device needs: none, software (a software TPM or a TPM the hub
        /// cannot vouch for), tpm (EK certificate chaining to a CA given with
        /// `serve --ek-ca`). Checked at enrollment and on every connection.
        #[arg(long, default_value = "none")]
        require: String,
        /// PCRs (sha256 bank) to quote and compare, e.g. 0-7 or 0,2,4,7.
        #[arg(long, default_value = "0-7")]
        pcrs: String,
        /// Trust on first use: the first verified measurements become the device's
        /// accepted set; a later change quarantines it.
        #[arg(long)]
        tofu: bool,
        /// Allowed value of a PCR, as INDEX=HEX (repeatable; several per PCR allowed).
        #[arg(long)]
        golden: Vec<String>,
        /// Lower is checked first.
        #[arg(long, default_value_t = 100)]
        priority: i64,
    },
    /// Delete a policy.
    Rm { name: String },
}

fn parse_pcrs(s: &str) -> CliResult<Vec<u32>> {
    let usage = |what: &str| CliError {
        code: exit::USAGE,
        error: anyhow::anyhow!("--pcrs {s:?}: {what}; write e.g. 0-7 or 0,2,4,7"),
    };
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (u32, u32) = (
            a.trim().parse().map_err(|_| usage("not a number"))?,
            b.trim().parse().map_err(|_| usage("not a number"))?,
        );
        if a > b || b > 23 {
            return Err(usage("PCRs are 0-23"));
        }
        out.extend(a..=b);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

pub(crate) async fn run(client: &Client, cmd: PolicyCmd, json: bool) -> CliResult<()> {
    match cmd {
        PolicyCmd::Ls => {
            let ps: Vec<AttestPolicy> = client.get("/v1/attestation/policies").await?;
            if json {
                cli::print_json(&ps)?;
            } else {
                let mut ps = ps;
                ps.sort_by(|a, b| (a.priority, &a.name).cmp(&(b.priority, &b.name)));
                let rows: Vec<Vec<String>> = ps.iter().map(cli::policy_row).collect();
                cli::print_table(
                    &[
                        "NAME", "PRIORITY", "SELECTOR", "REQUIRE", "PCRS", "TOFU", "GOLDEN",
                    ],
                    &rows,
                );
            }
        }
        PolicyCmd::Set {
            name,
            selector,
            require,
            pcrs,
            tofu,
            golden,
            priority,
        } => {
            let mut gold: std::collections::BTreeMap<u32, Vec<String>> = Default::default();
            for g in &golden {
                let Some((i, v)) = g.split_once('=') else {
                    return Err(CliError {
                        code: exit::USAGE,
                        error: anyhow::anyhow!("--golden {g:?}: write INDEX=HEX, e.g. 4=ab12…"),
                    });
                };
                let i: u32 = i.trim().parse().map_err(|_| CliError {
                    code: exit::USAGE,
                    error: anyhow::anyhow!("--golden {g:?}: {i:?} is not a PCR index"),
                })?;
                gold.entry(i).or_default().push(v.trim().to_lowercase());
            }
            let body = AttestPolicy {
                name: name.clone(),
                selector: selector.clone(),
                priority,
                require: require.parse().map_err(|e: String| CliError {
                    code: exit::USAGE,
                    error: anyhow::anyhow!("--require: {e}"),
                })?,
                pcrs: parse_pcrs(&pcrs)?,
                tofu,
                golden: gold,
            };
            let p: AttestPolicy = client.put("/v1/attestation/policies", &body).await?;
            if json {
                cli::print_json(&p)?;
            } else {
                println!(
                    "policy {name} applies to devices matching {selector} from their next connection"
                );
            }
        }
        PolicyCmd::Rm { name } => {
            let r: Deleted = client
                .delete(&format!("/v1/attestation/policies/{name}"))
                .await?;
            if json {
                cli::print_json(&r)?;
            } else {
                println!("policy {name} deleted");
            }
        }
    }
    Ok(())
}

//! `cairn-hub token`: join tokens.

use std::time::Duration;

use cairn_hub::api::{CreateToken, CreatedToken};
use cairn_hub::cli::{self, CliResult, Client};
use cairn_hub::store::TokenInfo;
use clap::Subcommand;

#[derive(Subcommand)]
pub(crate) enum TokenCmd {
    /// Create a join token and print it (shown only once).
    Create {
        /// How long the token is valid, e.g. 30m, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// How many devices may enroll with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Labels for devices enrolled with it, e.g. site=paris,role=kiosk.
        #[arg(long, default_value = "")]
        labels: String,
    },
    /// List tokens (without their secrets).
    #[command(visible_alias = "ls")]
    List,
}

pub(crate) async fn run(client: &Client, cmd: TokenCmd, json: bool) -> CliResult<()> {
    match cmd {
        TokenCmd::Create { ttl, uses, labels } => {
            let body = CreateToken {
                ttl_secs: ttl.as_secs().max(1),
                uses,
                labels: labels.clone(),
            };
            let t: CreatedToken = client.post("/v1/tokens", &body).await?;
            if json {
                cli::print_json(&t)?;
            } else {
                println!("{}", t.token);
                eprintln!(
                    "token {}: {} use(s), expires in {}, labels {}",
                    t.info.id,
                    uses,
                    humantime::format_duration(ttl),
                    if labels.is_empty() { "(none)" } else { &labels }
                );
            }
        }
        TokenCmd::List => {
            let ts: Vec<TokenInfo> = client.get("/v1/tokens").await?;
            if json {
                cli::print_json(&ts)?;
            } else {
                let now = cairn_hub::endpoint::now_ms();
                let rows: Vec<Vec<String>> = ts
                    .iter()
                    .map(|t| {
                        let exp = t.expires_ms;
                        vec![
                            t.id.clone(),
                            format!("{}/{}", t.uses_left, t.uses_total),
                            if exp <= now {
                                "expired".into()
                            } else {
                                format!(
                                    "in {}",
                                    humantime::format_duration(Duration::from_secs(
                                        (exp - now) / 1000
                                    ))
                                )
                            },
                            cli::labels_of(&t.labels),
                        ]
                    })
                    .collect();
                cli::print_table(&["ID", "USES LEFT", "EXPIRES", "LABELS"], &rows);
            }
        }
    }
    Ok(())
}

//! `cairn-hub release …` and `cairn-hub os …`: release keys, building, verifying and
//! pushing bundles, listing releases and rollouts, assigning the desired OS. (Part of
//! the `cairn-hub` binary; `keygen`, `build` and `verify` need no hub.)

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cairn_hub::api::Deleted;
use cairn_hub::api::{AddReleaseKey, AddedReleaseKey, OsSpec, Pushed, ReleaseStatus, ReleaseView};
use cairn_hub::cli::{self, CliError, CliResult, Client, exit};
use cairn_hub::release::{self as rel, BuildInput, BuildSpec, BundleInfo};
use cairn_hub::store::AssignOutcome;
use cairn_hub::store::{ReleaseKeyRecord, UpgradeStatus};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

use crate::cmd::state::TargetArgs;

#[derive(Subcommand)]
pub enum ReleaseCmd {
    /// Create a release signing key (ed25519). Keep the private key off the hub.
    ///
    /// Writes FILE (PKCS#8 PEM, mode 0600) and FILE.pub (the public key as hex), and
    /// prints the public key and its key id. Then trust it on the hub:
    ///   cairn-hub release keygen --out ~/keys/release-2025.pem
    ///   cairn-hub release key add ~/keys/release-2025.pem.pub --name release-2025
    #[command(verbatim_doc_comment)]
    Keygen {
        /// Where to write the private key (never overwritten).
        #[arg(long)]
        out: PathBuf,
    },
    /// Release keys this hub trusts (and hands to devices with their desired OS).
    ///
    /// Rotation: add the new key, sign new releases with it, remove the old one once
    /// no assigned release is signed with it.
    #[command(subcommand, verbatim_doc_comment)]
    Key(KeyCmd),
    /// Build a release bundle (FILE.cairn) from a root filesystem image, offline.
    ///
    /// The image is streamed (read twice: indexed, then copied), never held in memory.
    /// Examples:
    ///   cairn-hub release build rootfs.img --version 1.2.0 --arch x86_64 --board nuc \
    ///       --key release.pem --out os-1.2.0.cairn
    ///   cairn-hub release build rootfs.img --version 1.3.0-rc.1 --arch aarch64 --board rpi4 \
    ///       --key release.pem --payload kernel=Image --expect-pcr 4=9a1c… --out os.cairn
    #[command(verbatim_doc_comment)]
    Build(BuildArgs),
    /// Check a bundle offline: signature, every payload's sha256, block indexes, layout.
    ///
    /// With --key-pub the signature must verify with one of those keys; without it only
    /// structure and digests are checked (and the output says so). Exit code 1 on any
    /// mismatch.
    ///   cairn-hub release verify os-1.2.0.cairn --key-pub release.pem.pub
    #[command(verbatim_doc_comment)]
    Verify {
        file: PathBuf,
        /// Trusted public key: 64 hex digits or a file (FILE.pub, PEM); repeatable.
        #[arg(long = "key-pub")]
        key_pub: Vec<String>,
    },
    /// Upload a bundle to the hub, which checks it against its trusted release keys.
    ///
    /// Pushing the same release again is a no-op; another bundle with the same version
    /// is refused (versions are immutable).
    ///   cairn-hub release push os-1.2.0.cairn
    #[command(verbatim_doc_comment)]
    Push { file: PathBuf },
    /// List releases on the hub (oldest version first).
    Ls,
    /// Delete a release (refused while it is assigned).
    Rm { version: String },
    /// Rollout of one release: the devices it is assigned to, their phase and progress.
    Status { version: String },
}

#[derive(Subcommand)]
pub enum KeyCmd {
    /// Trust a public release key: 64 hex digits, FILE.pub, a PUBLIC KEY PEM, or the
    /// private key file (its public half is taken).
    Add {
        key: String,
        /// What it is, e.g. ci-2025.
        #[arg(long, default_value = "")]
        name: String,
    },
    /// List trusted release keys.
    Ls,
    /// Stop trusting a key (by the id `key ls` shows). Devices learn it with their next
    /// desired-OS change.
    Rm { key_id: String },
}

#[derive(Args)]
pub struct BuildArgs {
    /// The root filesystem image (becomes payload `rootfs`).
    image: PathBuf,
    /// Semantic version, e.g. 1.2.0 or 2.0.0-rc.1 (releases are ordered by it).
    #[arg(long)]
    version: String,
    /// CPU architecture as Rust names it: x86_64, aarch64.
    #[arg(long)]
    arch: String,
    /// Board family: nuc, rpi4, qemu-x86_64, sim, …
    #[arg(long)]
    board: String,
    /// Private release key file (from `release keygen`).
    #[arg(long)]
    key: PathBuf,
    /// Another payload as NAME=PATH, e.g. kernel=vmlinuz or uki=linux.efi (repeatable).
    #[arg(long = "payload")]
    payloads: Vec<String>,
    /// A PCR value booting it will measure, INDEX=HEX (sha256), repeatable; attested
    /// devices it is assigned to may then boot it without quarantine.
    #[arg(long = "expect-pcr")]
    expect_pcrs: Vec<String>,
    /// The bundle to write (written as FILE.tmp, then renamed).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Subcommand)]
pub enum OsCmd {
    /// Make a stored release the desired OS of a device or of a label selector.
    ///
    /// Devices download only the blocks they do not already have, install into their
    /// inactive slot, boot it on trial and commit it when healthy (else roll back).
    /// Examples:
    ///   cairn-hub os set --selector site=paris 1.2.0
    ///   cairn-hub os set --device dev-1a2b 1.1.0 --downgrade
    ///   cairn-hub os set --selector role=kiosk 1.2.0 --health-timeout 10m \
    ///       --health-cmd 'systemctl is-active kiosk'
    #[command(verbatim_doc_comment)]
    Set(OsSetArgs),
    /// Remove the desired OS of a device or selector (devices keep what they run).
    Unset {
        #[command(flatten)]
        target: TargetArgs,
    },
}

#[derive(Args)]
pub struct OsSetArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// The release's version (see `cairn-hub release ls`).
    version: String,
    /// Allow installing a version older than the one the device committed.
    #[arg(long)]
    downgrade: bool,
    /// How long the trial boot has to become healthy before it is rolled back.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    health_timeout: Duration,
    /// The trial boot need not reach the hub to be healthy (boxes expected offline).
    #[arg(long)]
    offline_ok: bool,
    /// A shell command that must exit 0 on the trial boot (repeatable).
    #[arg(long = "health-cmd")]
    health_cmds: Vec<String>,
}

fn usage(e: impl std::fmt::Display) -> CliError {
    CliError {
        code: exit::USAGE,
        error: anyhow::anyhow!("{e}"),
    }
}

fn failed(e: impl std::fmt::Display) -> CliError {
    CliError {
        code: exit::FAILED,
        error: anyhow::anyhow!("{e}"),
    }
}

/// A progress bar on stderr, hidden when stderr is not a terminal or with --json.
fn bar(total: u64, json: bool, what: &str) -> ProgressBar {
    if json || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg:>10} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(what.to_string());
    pb
}

/// Whether this subcommand runs without a hub.
pub fn is_offline(cmd: &ReleaseCmd) -> bool {
    matches!(
        cmd,
        ReleaseCmd::Keygen { .. } | ReleaseCmd::Build(_) | ReleaseCmd::Verify { .. }
    )
}

fn info_json(info: &BundleInfo, file: &Path) -> Value {
    let m = &info.manifest;
    json!({
        "version": m.version.as_str(),
        "arch": m.arch.as_str(),
        "board": m.board.as_str(),
        "id": info.id().to_hex(),
        "key_id": info.signed.key_id.to_string(),
        "signature_checked": info.signature_checked,
        "file": file.display().to_string(),
        "bundle_len": info.layout.len,
        "created_ms": m.created_ms,
        "payloads": m.payloads.iter().map(|p| json!({
            "name": p.name.as_str(),
            "size": p.size,
            "blocks": p.blocks(),
            "sha256": hex::encode(p.sha256),
            "index_sha256": hex::encode(p.index_sha256),
        })).collect::<Vec<_>>(),
        "expected_pcrs": m.expected_pcrs.iter().map(|(i, v)| (i.to_string(), json!(hex::encode(v)))).collect::<serde_json::Map<_, _>>(),
    })
}

fn print_info(info: &BundleInfo) {
    let m = &info.manifest;
    println!("  version     {} ({}/{})", m.version, m.arch, m.board);
    println!("  release id  {}", info.id().to_hex());
    println!("  signed by   release key {}", info.signed.key_id);
    for p in &m.payloads {
        println!(
            "  payload     {:<8} {:>10} ({} blocks) sha256:{}",
            p.name.as_str(),
            cli::human_bytes(p.size),
            p.blocks(),
            &hex::encode(p.sha256)[..16]
        );
    }
    for (i, v) in &m.expected_pcrs {
        println!("  expects     PCR {i} = {}", hex::encode(v));
    }
    println!(
        "  bundle      {} ({} bytes)",
        cli::human_bytes(info.layout.len),
        info.layout.len
    );
}

/// The offline subcommands.
pub fn offline(cmd: ReleaseCmd, json: bool) -> CliResult<()> {
    match cmd {
        ReleaseCmd::Keygen { out } => {
            let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
            let pub_path = rel::write_signing_key(&out, &key).map_err(failed)?;
            let vk = key.verifying_key();
            if json {
                cli::print_json(&json!({
                    "private_key": out.display().to_string(),
                    "public_key_file": pub_path.display().to_string(),
                    "public_key": hex::encode(vk.as_bytes()),
                    "key_id": rel::key_id(&vk),
                }))?;
            } else {
                println!("{}", hex::encode(vk.as_bytes()));
                eprintln!(
                    "release key {} written to {} (mode 0600; keep it off the hub), public key to {}\n\
                     trust it on the hub: cairn-hub release key add {}",
                    rel::key_id(&vk),
                    out.display(),
                    pub_path.display(),
                    pub_path.display()
                );
            }
            Ok(())
        }
        ReleaseCmd::Build(a) => build(a, json),
        ReleaseCmd::Verify { file, key_pub } => {
            let keys = key_pub
                .iter()
                .map(|k| rel::parse_public_key(k))
                .collect::<Result<Vec<_>, _>>()
                .map_err(usage)?;
            let len = std::fs::metadata(&file)
                .map_err(|e| usage(format!("{}: {e}", file.display())))?
                .len();
            let pb = bar(len, json, "verifying");
            let trusted = (!keys.is_empty()).then_some(keys);
            let result = rel::verify_file(&file, trusted, &mut |n| pb.inc(n));
            pb.finish_and_clear();
            let info = result.map_err(|e| failed(format!("{}: {e}", file.display())))?;
            if json {
                cli::print_json(&info_json(&info, &file))?;
            } else {
                if info.signature_checked {
                    println!(
                        "ok: {} verified: signature by trusted release key {}, every payload digest and block index",
                        file.display(),
                        info.signed.key_id
                    );
                } else {
                    println!(
                        "ok: {} structure and digests verified; signature NOT checked (give --key-pub to check it)",
                        file.display()
                    );
                }
                print_info(&info);
            }
            Ok(())
        }
        _ => Err(usage("this subcommand needs a hub")),
    }
}

fn build(a: BuildArgs, json: bool) -> CliResult<()> {
    let key = rel::read_signing_key(&a.key).map_err(usage)?;
    let mut inputs = vec![BuildInput {
        name: "rootfs".into(),
        path: a.image.clone(),
    }];
    for p in &a.payloads {
        let Some((name, path)) = p.split_once('=') else {
            return Err(usage(format!(
                "--payload {p:?}: write NAME=PATH, e.g. kernel=vmlinuz"
            )));
        };
        inputs.push(BuildInput {
            name: name.trim().to_string(),
            path: PathBuf::from(path),
        });
    }
    let mut total = 0;
    for i in &inputs {
        total += std::fs::metadata(&i.path)
            .map_err(|e| usage(format!("{}: {e}", i.path.display())))?
            .len();
    }
    let expected_pcrs = a
        .expect_pcrs
        .iter()
        .map(|s| rel::parse_expect_pcr(s))
        .collect::<Result<Vec<_>, _>>()
        .map_err(usage)?;
    let spec = BuildSpec {
        version: a.version,
        arch: a.arch,
        board: a.board,
        inputs,
        expected_pcrs,
        created_ms: cairn_hub::endpoint::now_ms(),
    };
    let pb = bar(2 * total, json, "building");
    let result = rel::build(&spec, &key, &a.out, &mut |n| pb.inc(n));
    pb.finish_and_clear();
    let info = result.map_err(|e| match e {
        rel::BundleError::Input(_) | rel::BundleError::Release(_) => usage(e),
        e => failed(e),
    })?;
    if json {
        cli::print_json(&info_json(&info, &a.out))?;
    } else {
        println!("built {}", a.out.display());
        print_info(&info);
        eprintln!("next: cairn-hub release push {}", a.out.display());
    }
    Ok(())
}

async fn push(client: &Client, file: PathBuf, json: bool) -> CliResult<()> {
    // Fail fast, before streaming a large file, on what the hub will refuse anyway.
    let (signed, _) =
        rel::read_header(&file).map_err(|e| failed(format!("{}: {e}", file.display())))?;
    let manifest = signed
        .decode_unverified()
        .map_err(|e| failed(format!("{}: {e}", file.display())))?;
    let keys: Vec<ReleaseKeyRecord> = client.get("/v1/release-keys").await?;
    let key_id = signed.key_id.to_string();
    if !keys.iter().any(|k| k.key_id == key_id) {
        return Err(failed(format!(
            "{} is signed with release key {key_id}, which the hub does not trust; add it first: cairn-hub release key add FILE.pub",
            file.display()
        )));
    }
    let id = signed.id().to_hex();
    let existing: CliResult<ReleaseView> = client
        .get(&format!("/v1/releases/{}", manifest.version))
        .await;
    match existing {
        Ok(r) if r.record.id == id => {
            if json {
                cli::print_json(&Pushed {
                    release: r,
                    outcome: "already-present".into(),
                })?;
            } else {
                println!(
                    "release {} is already on the hub (same id {}); nothing to push",
                    manifest.version,
                    &id[..16]
                );
            }
            return Ok(());
        }
        Ok(r) => {
            return Err(failed(format!(
                "version {} is already on the hub with different content (release {}); versions are immutable: build a new version",
                manifest.version, r.record.id
            )));
        }
        Err(e) if e.code == exit::NOT_FOUND => {}
        Err(e) => return Err(e),
    }
    let len = std::fs::metadata(&file)
        .map_err(|e| usage(format!("{}: {e}", file.display())))?
        .len();
    let f = tokio::fs::File::open(&file)
        .await
        .map_err(|e| usage(format!("{}: {e}", file.display())))?;
    let pb = bar(len, json, "pushing");
    let stream = futures_util::stream::try_unfold((f, pb.clone()), |(mut f, pb)| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 256 * 1024];
        let n = f.read(&mut buf).await?;
        if n == 0 {
            return Ok::<_, std::io::Error>(None);
        }
        buf.truncate(n);
        pb.inc(n as u64);
        Ok(Some((buf, (f, pb))))
    });
    let result: CliResult<Pushed> = client
        .post_stream("/v1/releases", reqwest::Body::wrap_stream(stream), len)
        .await;
    pb.finish_and_clear();
    let r = result?;
    if json {
        cli::print_json(&r)?;
    } else {
        let what = if r.outcome == "stored" {
            "pushed"
        } else {
            "already present:"
        };
        println!(
            "{what} release {} ({}/{}), id {}, {} — assign it with: cairn-hub os set --selector KEY=VALUE {}",
            r.release.record.version,
            r.release.record.arch,
            r.release.record.board,
            r.release
                .record
                .id
                .get(..16)
                .unwrap_or(&r.release.record.id),
            cli::human_bytes(r.release.record.bundle_len),
            r.release.record.version
        );
    }
    Ok(())
}

fn progress_cell(up: &UpgradeStatus) -> String {
    if up.bytes_total == 0 {
        return "-".into();
    }
    format!(
        "{}% ({} downloaded)",
        up.bytes_done.saturating_mul(100) / up.bytes_total,
        cli::human_bytes(up.bytes_downloaded)
    )
}

/// The subcommands that talk to the hub.
pub async fn online(client: &Client, cmd: ReleaseCmd, json: bool) -> CliResult<()> {
    match cmd {
        ReleaseCmd::Key(KeyCmd::Add { key, name }) => {
            let vk = rel::parse_public_key(&key).map_err(usage)?;
            let r: AddedReleaseKey = client
                .post(
                    "/v1/release-keys",
                    &AddReleaseKey {
                        public_key: hex::encode(vk.as_bytes()),
                        name,
                    },
                )
                .await?;
            if json {
                cli::print_json(&r)?;
            } else if r.added {
                println!(
                    "the hub now trusts release key {}; devices get it with their next desired-OS assignment",
                    r.key.key_id
                );
            } else {
                println!("release key {} was trusted already", r.key.key_id);
            }
        }
        ReleaseCmd::Key(KeyCmd::Ls) => {
            let ks: Vec<ReleaseKeyRecord> = client.get("/v1/release-keys").await?;
            if json {
                cli::print_json(&ks)?;
            } else {
                let rows: Vec<Vec<String>> = ks
                    .iter()
                    .map(|k| {
                        vec![
                            k.key_id.clone(),
                            k.name.clone(),
                            cli::ago(Some(k.added_ms)),
                            k.public_key.clone(),
                        ]
                    })
                    .collect();
                cli::print_table(&["KEY ID", "NAME", "ADDED", "PUBLIC KEY"], &rows);
            }
        }
        ReleaseCmd::Key(KeyCmd::Rm { key_id }) => {
            let r: Deleted = client.delete(&format!("/v1/release-keys/{key_id}")).await?;
            if json {
                cli::print_json(&r)?;
            } else {
                println!(
                    "release key {key_id} is no longer trusted; releases signed with it can no longer be pushed or assigned"
                );
            }
        }
        ReleaseCmd::Push { file } => push(client, file, json).await?,
        ReleaseCmd::Ls => {
            let rs: Vec<ReleaseView> = client.get("/v1/releases").await?;
            if json {
                cli::print_json(&rs)?;
            } else {
                let rows: Vec<Vec<String>> = rs
                    .iter()
                    .map(|r| {
                        let rec = &r.record;
                        vec![
                            rec.version.clone(),
                            rec.arch.clone(),
                            rec.board.clone(),
                            cli::human_bytes(rec.bundle_len),
                            rec.key_id.clone(),
                            cli::ago(Some(rec.pushed_ms)),
                            r.devices.to_string(),
                        ]
                    })
                    .collect();
                cli::print_table(
                    &[
                        "VERSION", "ARCH", "BOARD", "SIZE", "KEY", "PUSHED", "DEVICES",
                    ],
                    &rows,
                );
            }
        }
        ReleaseCmd::Rm { version } => {
            let r: Deleted = client.delete(&format!("/v1/releases/{version}")).await?;
            if json {
                cli::print_json(&r)?;
            } else {
                println!("release {version} deleted");
            }
        }
        ReleaseCmd::Status { version } => {
            let st: ReleaseStatus = client
                .get(&format!("/v1/releases/{version}/status"))
                .await?;
            if json {
                cli::print_json(&st)?;
            } else {
                let devices = &st.devices;
                println!(
                    "release {version}: assigned to {} {}",
                    devices.len(),
                    if devices.len() == 1 {
                        "device"
                    } else {
                        "devices"
                    }
                );
                let rows: Vec<Vec<String>> = devices
                    .iter()
                    .map(|d| {
                        let up = d.upgrade.as_ref();
                        let mine = up.filter(|u| u.version == version);
                        vec![
                            d.device.clone(),
                            d.hostname.clone(),
                            if d.connected { "online" } else { "offline" }.to_string(),
                            d.state.clone(),
                            mine.map_or_else(|| "-".into(), progress_cell),
                            up.map_or("-", |u| u.committed_version.as_str()).to_string(),
                            mine.and_then(|u| u.error.clone()).unwrap_or_default(),
                        ]
                    })
                    .collect();
                cli::print_table(
                    &[
                        "DEVICE",
                        "HOSTNAME",
                        "STATUS",
                        "STATE",
                        "PROGRESS",
                        "COMMITTED",
                        "ERROR",
                    ],
                    &rows,
                );
            }
        }
        ReleaseCmd::Keygen { .. } | ReleaseCmd::Build(_) | ReleaseCmd::Verify { .. } => {
            offline(cmd, json)?
        }
    }
    Ok(())
}

/// `os set` / `os unset`.
pub async fn os(client: &Client, cmd: OsCmd, json: bool) -> CliResult<AssignOutcome> {
    let body = match cmd {
        OsCmd::Set(a) => {
            let secs = u32::try_from(a.health_timeout.as_secs())
                .ok()
                .filter(|s| *s > 0)
                .ok_or_else(|| usage("--health-timeout must be between 1s and ~136 years"))?;
            let mut b = cli::state_change(a.target.device, a.target.selector, "os", None);
            b.os = Some(OsSpec {
                version: a.version,
                allow_downgrade: a.downgrade,
                health_timeout_s: secs,
                require_hub: !a.offline_ok,
                health_commands: a.health_cmds,
            });
            b
        }
        OsCmd::Unset { target } => cli::state_change(target.device, target.selector, "os", None),
    };
    let _ = json;
    client.post("/v1/state", &body).await
}

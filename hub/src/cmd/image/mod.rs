//! `cairn-hub image configure|show`: the first-boot configuration of a flashable disk
//! image. (Part of the `cairn-hub` binary; offline: these commands touch a file, never
//! the hub.)
//!
//! One generic image serves a whole fleet; what makes it a box of *this* fleet is one
//! file, `cairn/agent.toml` on the image's EFI System Partition: the first GPT partition
//! of type C12A7328-F81F-11D2-BA4B-00A0C93EC93B (named `esp` on x86; on a Raspberry Pi
//! image the firmware's FAT boot partition, `boot`, has that type too). A box's init
//! mounts it at /boot/efi and runs
//! `cairn-agent run --config /etc/cairn/agent.toml --config /boot/efi/cairn/agent.toml`.
//!
//! Everything happens on the image file itself, without root, loop devices or mounts:
//! [`Gpt::read`] reads and checks the partition table with `cairn_disk::gpt` (signature,
//! header and entry-array CRC32s, placement; a damaged primary is refused, a damaged
//! backup copy is a warning), and the `fatfs` crate
//! reads and writes the FAT inside the ESP through a [`Window`] of the file.
//! The new file is written as `agent.toml.new` and renamed over the old one, so an ESP
//! that fills up midway keeps the configuration it had.

use std::io::{self, Read};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

mod esp;

use cairn_disk::gpt::Partition;
use cairn_disk::window::Window;
use cairn_hub::cli::{self, CliError, CliResult, exit};
use cairn_sync_protocol::token::JoinToken;
use clap::{Args, Subcommand};
use esp::{
    Image, fat_name, fix_dot_entries, free_space, has_config_dir, is_full, read_config,
    write_config,
};
use serde_json::{Value, json};

/// Where the agent looks for the file, relative to the ESP's root.
pub const CONFIG_PATH: &str = "cairn/agent.toml";
const CONFIG_DIR: &str = "cairn";
const CONFIG_NAME: &str = "agent.toml";
/// Written first, then renamed to [`CONFIG_NAME`].
const CONFIG_TMP: &str = "agent.toml.new";
/// A first-boot file larger than this is not one of ours.
const MAX_CONFIG: u64 = 64 << 10;

pub const AFTER_HELP: &str = "\
Exit codes: 0 done; 1 the image cannot be used as asked (no valid GPT, no EFI System
Partition, ESP not FAT, ESP full, image read-only; the message says which and what
to do); 2 bad usage (no such image file, invalid join token, --hub not HOST:PORT,
--ca-pin not the token's); 3 `show` only: the image has no first-boot configuration;
6 `configure` only: the image is configured already (--force replaces it).

Operator flow (the image: a raw GPT disk image, uncompressed):
  cairn-hub token create --ttl 24h --uses 20 --labels site=paris > batch.token
  cairn-hub image configure cairn-nuc.img --hub hub.example.net:7440 --token-file batch.token
  cairn-hub image show cairn-nuc.img
  dd if=cairn-nuc.img of=/dev/sdX bs=4M conv=fsync      # flash it
The join token sits in clear on the image until the box enrolls: give each batch its
own token with few uses and a short expiry (SECURITY.md).";

#[derive(Subcommand)]
pub enum ImageCmd {
    /// Write the first-boot configuration (hub address, join token) onto a disk image.
    ///
    /// Writes `cairn/agent.toml` on the image's EFI System Partition (the first GPT
    /// partition of that type), without root or mounts. The token is checked and the
    /// hub CA fingerprint it pins is printed: the agent trusts only that CA when it
    /// enrolls. Nothing is sent to the hub.
    ///   cairn-hub image configure cairn.img --hub hub.example.net:7440 --token-file batch.token
    ///   cairn-hub token create --uses 5 | cairn-hub image configure cairn.img \
    ///       --hub hub.example.net:7440 --token-file - --ca-pin 3f1c…
    #[command(verbatim_doc_comment, after_help = AFTER_HELP)]
    Configure(ConfigureArgs),
    /// Print an image's first-boot configuration, the join token shown by its id only.
    #[command(after_help = AFTER_HELP)]
    Show {
        /// The disk image (raw, uncompressed), or a disk device.
        image: PathBuf,
    },
}

#[derive(Args)]
pub struct ConfigureArgs {
    /// The disk image (raw, uncompressed), or a disk device.
    image: PathBuf,
    /// The hub's QUIC address as the boxes reach it, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    hub: String,
    #[command(flatten)]
    token: TokenArgs,
    /// SHA-256 fingerprint (hex) of the hub CA the token must pin; a check that the
    /// token is from the hub you mean (its `endpoints.json` has `ca_fingerprint`).
    #[arg(long, value_name = "HEX")]
    ca_pin: Option<String>,
    /// Replace the image's existing first-boot configuration.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
#[group(id = "token_source", required = true, multiple = false)]
pub struct TokenArgs {
    /// The join token (`cairn-hub token create` prints it). Visible to other local
    /// users and kept in shell history: --token-file is safer.
    #[arg(long, group = "token_source")]
    token: Option<String>,
    /// Read the join token from this file; `-` reads standard input.
    #[arg(long, value_name = "FILE", group = "token_source")]
    token_file: Option<PathBuf>,
}

/// What can go wrong with the image (not with the command line).
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: no such file; give the path of a raw disk image (or disk device)")]
    Missing { path: String },
    #[error("opening {path}: {source}")]
    Open { path: String, source: io::Error },
    #[error("{path} is a directory; give the path of a raw disk image")]
    Directory { path: String },
    #[error(
        "{path} is {format}-compressed: decompress it first ({hint}), then configure and flash the raw image"
    )]
    Compressed {
        path: String,
        format: &'static str,
        hint: String,
    },
    #[error(
        "{path} is not a Cairn disk image: {why}. Cairn images have a GPT with an EFI System \
         Partition; check the path, or build the image with a GPT (e.g. sgdisk)"
    )]
    NoGpt { path: String, why: String },
    #[error(
        "{path}: the GPT is damaged: {why}; rebuild the image, or see `sgdisk --verify {path}`"
    )]
    BadGpt { path: String, why: String },
    #[error(
        "{path}: the GPT has no EFI System Partition (partitions: {parts}); Cairn images need a \
         FAT partition of type EF00 (C12A7328-F81F-11D2-BA4B-00A0C93EC93B), `esp` on x86, \
         `boot` on a Raspberry Pi"
    )]
    NoEsp { path: String, parts: String },
    #[error(
        "{path}: {esp} is not a FAT filesystem ({why}); format it (mkfs.vfat -F 32) or rebuild \
         the image"
    )]
    NotFat {
        path: String,
        esp: String,
        why: String,
    },
    #[error(
        "{path}: {esp} is full ({free} bytes free, {need} needed); delete files from it or \
         make it larger"
    )]
    EspFull {
        path: String,
        esp: String,
        free: u64,
        need: u64,
    },
    #[error(
        "{path} is read-only ({source}); make it writable (chmod u+w {path}) or configure a \
         writable copy"
    )]
    ReadOnly { path: String, source: io::Error },
    #[error("{path} is configured already ({current}); give --force to replace its configuration")]
    Configured { path: String, current: String },
    #[error("{path}: {what} {CONFIG_PATH} on {esp}: {source}")]
    Fat {
        path: String,
        esp: String,
        what: &'static str,
        source: io::Error,
    },
    #[error("{path}: {what}: {source}")]
    Io {
        path: String,
        what: &'static str,
        source: io::Error,
    },
}

impl ImageError {
    /// The exit code, as `AFTER_HELP` documents it.
    fn code(&self) -> u8 {
        match self {
            ImageError::Missing { .. } | ImageError::Directory { .. } => exit::USAGE,
            ImageError::Configured { .. } => exit::EXISTS,
            _ => exit::FAILED,
        }
    }
}

fn cli_error(e: ImageError) -> CliError {
    CliError {
        code: e.code(),
        error: anyhow::Error::new(e),
    }
}

fn usage(e: impl std::fmt::Display) -> CliError {
    CliError {
        code: exit::USAGE,
        error: anyhow::anyhow!("{e}"),
    }
}

pub fn run(cmd: ImageCmd, json: bool) -> CliResult<()> {
    match cmd {
        ImageCmd::Configure(a) => configure(a, json),
        ImageCmd::Show { image } => show(&image, json),
    }
}

// ---------------------------------------------------------------------------------------
// The command line's inputs.

/// The join token's text, from `--token` or `--token-file`.
fn token_text(a: &TokenArgs) -> CliResult<(String, &'static str)> {
    match (&a.token, &a.token_file) {
        (Some(t), _) => Ok((t.trim().to_string(), "--token")),
        (None, Some(f)) => {
            let mut text = String::new();
            let read = if f.as_os_str() == "-" {
                io::stdin().read_to_string(&mut text).map(|_| ())
            } else {
                std::fs::read_to_string(f).map(|t| text = t)
            };
            read.map_err(|e| usage(format!("reading --token-file {}: {e}", f.display())))?;
            let t = text.trim();
            if t.split_whitespace().nth(1).is_some() {
                return Err(usage(format!(
                    "--token-file {}: holds more than one word; put only the token \
                     `cairn-hub token create` printed in it",
                    f.display()
                )));
            }
            Ok((t.to_string(), "--token-file"))
        }
        (None, None) => Err(usage("give --token or --token-file")),
    }
}

/// Checks HOST:PORT the way the agent will resolve it (`host:port` or `[v6]:port`).
fn check_hub(s: &str) -> Result<(), String> {
    let bad = |why: &str| {
        format!(
            "--hub {s:?}: {why}; write HOST:PORT, e.g. hub.example.net:7440 or [2001:db8::1]:7440"
        )
    };
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return if addr.port() == 0 {
            Err(bad("port 0 is not a port"))
        } else {
            Ok(())
        };
    }
    let (host, port) = s.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err(bad("the port must be a number from 1 to 65535")),
    }
    if host.is_empty() {
        return Err(bad("no host"));
    }
    if host.contains(':') || host.starts_with('[') {
        return Err(bad(
            "not a valid IPv6 address (IPv6 addresses go in brackets)",
        ));
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(bad("the host is neither an IP address nor a DNS name"));
    }
    if name
        .split('.')
        .all(|l| l.bytes().all(|b| b.is_ascii_digit()))
        && name.parse::<Ipv4Addr>().is_err()
    {
        return Err(bad("not a valid IPv4 address"));
    }
    Ok(())
}

/// Whether the boxes would look for the hub on themselves.
fn is_loopback(hub: &str) -> bool {
    match hub.parse::<SocketAddr>() {
        Ok(a) => a.ip().is_loopback(),
        Err(_) => hub
            .rsplit_once(':')
            .is_some_and(|(h, _)| h.eq_ignore_ascii_case("localhost")),
    }
}

/// `--ca-pin`: 64 hex digits, optionally `sha256:`-prefixed or colon-separated.
fn parse_pin(s: &str) -> Result<[u8; 32], String> {
    let t = s.trim();
    let t = t.strip_prefix("sha256:").unwrap_or(t);
    let digits: String = t.chars().filter(|c| *c != ':').collect();
    let mut pin = [0u8; 32];
    hex::decode_to_slice(&digits, &mut pin).map_err(|_| {
        format!("--ca-pin {s:?}: give the hub CA's SHA-256 fingerprint as 64 hex digits")
    })?;
    Ok(pin)
}

// ---------------------------------------------------------------------------------------
// The file's contents.

/// The first-boot file: exactly the keys of the agent's config file (`hub`,
/// `join_token`), with a comment saying what it is.
fn render(hub: &str, token: &str, token_id: &str) -> Result<String, toml::ser::Error> {
    #[derive(serde::Serialize)]
    struct FirstBoot<'a> {
        hub: &'a str,
        join_token: &'a str,
    }
    let body = toml::to_string(&FirstBoot {
        hub,
        join_token: token,
    })?;
    Ok(format!(
        "# Cairn first-boot configuration, written by `cairn-hub image configure`.\n\
         # The agent reads it with --config /boot/efi/cairn/agent.toml. The join token\n\
         # (id {token_id}) matters only until the box has enrolled.\n\
         {body}"
    ))
}

/// What an image's first-boot file says, the token reduced to its id and CA pin.
#[derive(Debug)]
struct Summary {
    hub: Option<String>,
    token: Option<Result<JoinToken, String>>,
    /// Keys other than `hub` and `join_token`.
    other: toml::Table,
}

impl Summary {
    fn of(text: &str) -> Result<Summary, String> {
        let mut t: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
        let hub = t.remove("hub").map(|v| match v {
            toml::Value::String(s) => s,
            v => v.to_string(),
        });
        let token = t.remove("join_token").map(|v| match v {
            toml::Value::String(s) => JoinToken::parse(&s).map_err(|e| e.to_string()),
            _ => Err("join_token is not a string".into()),
        });
        Ok(Summary {
            hub,
            token,
            other: t,
        })
    }

    /// "hub X, token Y", for messages.
    fn brief(&self) -> String {
        format!(
            "hub {}, token {}",
            self.hub.as_deref().unwrap_or("(none)"),
            match &self.token {
                None => "(none)".into(),
                Some(Ok(t)) => t.id_hex(),
                Some(Err(_)) => "(invalid)".into(),
            }
        )
    }

    fn json(&self) -> Value {
        json!({
            "hub": self.hub,
            "join_token": match &self.token {
                None => Value::Null,
                Some(Ok(t)) => json!({
                    "id": t.id_hex(),
                    "ca_fingerprint": hex::encode(t.ca_fingerprint),
                }),
                Some(Err(e)) => json!({ "error": e }),
            },
            "other_keys": serde_json::to_value(&self.other).unwrap_or(Value::Null),
        })
    }
}

fn esp_json(esp: &Partition, fat: &str) -> Value {
    json!({
        "partition": esp.number,
        "name": esp.name,
        "offset": esp.offset,
        "size": esp.len,
        "filesystem": fat,
    })
}

fn warn(warnings: &[String], json: bool) {
    if !json {
        for w in warnings {
            eprintln!("warning: {w}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// The subcommands.

fn configure(a: ConfigureArgs, json: bool) -> CliResult<()> {
    let (token_text, from) = token_text(&a.token)?;
    let token = JoinToken::parse(&token_text).map_err(|e| usage(format!("{from}: {e}")))?;
    let pin = hex::encode(token.ca_fingerprint);
    if let Some(p) = &a.ca_pin
        && parse_pin(p).map_err(usage)? != token.ca_fingerprint
    {
        return Err(usage(format!(
            "--ca-pin {p} is not the hub CA this token pins (sha256:{pin}): the token \
             comes from another hub, or the pin is wrong; create the token on the hub \
             whose endpoints.json has that ca_fingerprint"
        )));
    }
    check_hub(&a.hub).map_err(usage)?;
    let mut warnings = Vec::new();
    if is_loopback(&a.hub) {
        warnings.push(format!(
            "--hub {} is a loopback address: each box would look for the hub on itself",
            a.hub
        ));
    }
    let text = render(&a.hub, &token_text, &token.id_hex())?;

    // Everything about the image is checked read-only first, so that a read-only
    // image that is not a Cairn image says the latter.
    let image = Image::open(&a.image).map_err(cli_error)?;
    warnings.extend(
        image
            .gpt
            .warnings
            .iter()
            .map(|w| format!("{}: {w}", image.shown())),
    );
    let esp = image.esp().map_err(cli_error)?.clone();
    let previous = {
        let fs = image.mount(&image.file, &esp).map_err(cli_error)?;
        read_config(&fs).map_err(|e| cli_error(image.fat_error(&esp, "reading")(e)))?
    };
    let previous = previous.map(|t| Summary::of(&t));
    if let Some(p) = &previous
        && !a.force
    {
        let current = match p {
            Ok(s) => s.brief(),
            Err(e) => format!("its {CONFIG_PATH} does not parse: {e}"),
        };
        return Err(cli_error(ImageError::Configured {
            path: image.shown(),
            current,
        }));
    }

    let file = image.reopen_writable().map_err(cli_error)?;
    let write_error = |e: io::Error| cli_error(image.fat_error(&esp, "writing")(e));
    let fs = image.mount(&file, &esp).map_err(cli_error)?;
    let fat = fat_name(fs.fat_type());
    let full = |free, need| {
        cli_error(ImageError::EspFull {
            path: image.shown(),
            esp: esp.describe(),
            free,
            need,
        })
    };
    let (free, need) = free_space(&fs, &text).map_err(write_error)?;
    if free < need {
        return Err(full(free, need));
    }
    let fs = if has_config_dir(&fs).map_err(write_error)? {
        fs
    } else {
        // Created and unmounted, then fixed up underneath fatfs, then mounted again.
        let fat32 = fs.fat_type() == fatfs::FatType::Fat32;
        let created = fs.root_dir().create_dir(CONFIG_DIR).map(drop);
        created.and_then(|()| fs.unmount()).map_err(|e| {
            if is_full(&e) {
                full(free, need)
            } else {
                write_error(e)
            }
        })?;
        let mut part = Window::new(&file, esp.offset, esp.len);
        fix_dot_entries(&mut part, fat32).map_err(write_error)?;
        image.mount(&file, &esp).map_err(cli_error)?
    };
    write_config(&fs, &text)
        .and_then(|()| fs.unmount())
        .map_err(|e| {
            if is_full(&e) {
                full(free, need)
            } else {
                write_error(e)
            }
        })?;
    file.sync_all()
        .map_err(|e| cli_error(image.fat_error(&esp, "syncing")(e)))?;

    let replaced = previous.is_some();
    if json {
        cli::print_json(&json!({
            "image": image.shown(),
            "outcome": if replaced { "replaced" } else { "configured" },
            "esp": esp_json(&esp, fat),
            "file": CONFIG_PATH,
            "hub": a.hub,
            "token_id": token.id_hex(),
            "ca_fingerprint": pin,
            "previous": previous.map(|p| match p {
                Ok(s) => s.json(),
                Err(e) => json!({ "error": e }),
            }),
            "warnings": warnings,
        }))?;
    } else {
        warn(&warnings, json);
        println!(
            "{} {}: {CONFIG_PATH} written on {} ({fat})",
            if replaced {
                "reconfigured"
            } else {
                "configured"
            },
            image.shown(),
            esp.describe()
        );
        if let Some(Ok(p)) = &previous {
            println!("  replaced    {}", p.brief());
        }
        println!("  hub         {}", a.hub);
        println!(
            "  join token  id {} (its secret is now on the image, in clear)",
            token.id_hex()
        );
        println!("  hub CA      sha256:{pin} (pinned by the token; the agent trusts only this CA)");
        eprintln!(
            "next: flash it, e.g. dd if={} of=/dev/sdX bs=4M conv=fsync; the token's uses and \
             expiry are on the hub: cairn-hub token list",
            image.shown()
        );
    }
    Ok(())
}

fn show(path: &Path, json: bool) -> CliResult<()> {
    let image = Image::open(path).map_err(cli_error)?;
    let warnings: Vec<String> = image
        .gpt
        .warnings
        .iter()
        .map(|w| format!("{}: {w}", image.shown()))
        .collect();
    let esp = image.esp().map_err(cli_error)?;
    let fs = image.mount(&image.file, esp).map_err(cli_error)?;
    let fat = fat_name(fs.fat_type());
    let text = read_config(&fs).map_err(|e| cli_error(image.fat_error(esp, "reading")(e)))?;
    let summary = text.as_deref().map(Summary::of);
    let mut out = json!({
        "image": image.shown(),
        "image_size": image.len,
        "sector_size": image.gpt.sector,
        "esp": esp_json(esp, fat),
        "file": CONFIG_PATH,
        "configured": text.is_some(),
        "warnings": warnings,
    });
    let Some(summary) = summary else {
        let error = anyhow::anyhow!(
            "{} is not configured: there is no {CONFIG_PATH} on its {} ({fat}); write one \
             with: cairn-hub image configure {} --hub HOST:PORT --token-file FILE",
            image.shown(),
            esp.describe(),
            image.shown()
        );
        if json {
            cli::print_json(&out)?;
        } else {
            warn(&warnings, json);
        }
        return Err(CliError {
            code: exit::NOT_FOUND,
            error,
        });
    };
    let summary = summary.map_err(|e| {
        cli_error(ImageError::Fat {
            path: image.shown(),
            esp: esp.describe(),
            what: "parsing",
            source: io::Error::new(io::ErrorKind::InvalidData, e),
        })
    })?;
    if json {
        if let (Some(o), Value::Object(s)) = (out.as_object_mut(), summary.json()) {
            o.extend(s);
        }
        return cli::print_json(&out);
    }
    warn(&warnings, json);
    println!(
        "{}: first-boot configuration in {CONFIG_PATH} on {} ({fat})",
        image.shown(),
        esp.describe()
    );
    println!(
        "  hub         {}",
        summary.hub.as_deref().unwrap_or("(none)")
    );
    match &summary.token {
        None => println!("  join token  (none)"),
        Some(Ok(t)) => {
            println!("  join token  id {} (secret not shown)", t.id_hex());
            println!("  hub CA      sha256:{}", hex::encode(t.ca_fingerprint));
        }
        Some(Err(e)) => println!("  join token  INVALID: {e}"),
    }
    for (k, v) in &summary.other {
        println!("  {k:<11} {v}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn token() -> JoinToken {
        JoinToken {
            id: [0x11; 8],
            secret: [0x22; 16],
            ca_fingerprint: [0x33; 32],
        }
    }

    /// The file the agent reads, byte for byte: `agent` parses the same fixture with
    /// its `FileConfig` (agent/src/main.rs), so the two cannot drift apart.
    #[test]
    fn rendered_file_is_the_fixture_the_agent_parses() {
        let t = token();
        let text = render("hub.example.net:7440", &t.encode(), &t.id_hex()).unwrap();
        assert_eq!(text, include_str!("../../../tests/data/first-boot.toml"));
        let s = Summary::of(&text).unwrap();
        assert_eq!(s.hub.as_deref(), Some("hub.example.net:7440"));
        assert_eq!(s.token, Some(Ok(t)));
        assert!(s.other.is_empty());
    }

    #[test]
    fn hub_addresses() {
        for ok in [
            "hub.example.net:7440",
            "hub:1",
            "10.0.0.1:7440",
            "[2001:db8::1]:7440",
            "localhost:7440",
            "hub.example.net.:7440",
        ] {
            assert_eq!(check_hub(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("hub.example.net", "no port"),
            ("hub:0", "port must be"),
            ("hub:http", "port must be"),
            (":7440", "no host"),
            ("2001:db8::1:7440", "IPv6"),
            ("[2001:db8::zz]:7440", "IPv6"),
            ("hub example:7440", "neither"),
            ("-hub:7440", "neither"),
            ("300.1.2.3:7440", "IPv4"),
            ("10.0.0.1:0", "port 0"),
        ] {
            let e = check_hub(bad).unwrap_err();
            assert!(e.contains(why) && e.contains("HOST:PORT"), "{bad}: {e}");
        }
        assert!(is_loopback("127.0.0.1:7440"));
        assert!(is_loopback("[::1]:7440"));
        assert!(is_loopback("LocalHost:7440"));
        assert!(!is_loopback("hub.example.net:7440"));
    }

    #[test]
    fn ca_pins() {
        let hex64 = "33".repeat(32);
        assert_eq!(parse_pin(&hex64), Ok([0x33; 32]));
        assert_eq!(
            parse_pin(&format!("sha256:{}", hex64.to_uppercase())),
            Ok([0x33; 32])
        );
        let colons: Vec<&str> = (0..32).map(|_| "33").collect();
        assert_eq!(parse_pin(&colons.join(":")), Ok([0x33; 32]));
        assert!(parse_pin("33").unwrap_err().contains("64 hex digits"));
        assert!(parse_pin(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn summaries_redact_and_keep_other_keys() {
        let s = Summary::of("hub = \"h:1\"\njoin_token = \"nope\"\nboard = \"rpi4\"\n").unwrap();
        assert_eq!(s.brief(), "hub h:1, token (invalid)");
        let j = s.json();
        assert!(
            j["join_token"]["error"]
                .as_str()
                .unwrap()
                .contains("cairn1_")
        );
        assert_eq!(j["other_keys"]["board"], "rpi4");
        let t = token();
        let s = Summary::of(&format!("join_token = \"{}\"", t.encode())).unwrap();
        let j = s.json().to_string();
        assert!(j.contains(&t.id_hex()) && !j.contains(&t.encode()) && !j.contains("2222"));
        assert!(Summary::of("hub = ").is_err());
    }
}

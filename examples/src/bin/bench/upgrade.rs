//! The `upgrade` section: a 256 MiB image installed into a file-backed slot by our
//! installer, by `dd` and by RAUC from a cold page cache (median of the runs), and the
//! share of a 10%-changed image our installer fetches as a delta, beside the new chunks
//! casync needs for the same change.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cairn_examples::mutate_blocks;
use cairn_examples::peers_rauc::{Rauc, casync_new_bytes};

use crate::{Row, row};

/// The image's size, and the slots'.
const SIZE: u64 = 256 << 20;
/// Our installer flushes every this many bytes, as the agent does by default.
const CHECKPOINT: u64 = 32 << 20;

/// The `upgrade` section: installing a 256 MiB image into a file-backed slot by our
/// installer, `dd` and RAUC; delta downloads against casync.
pub(crate) fn upgrade(dir: &Path, runs: usize, rows: &mut Vec<Row>) -> Result<()> {
    let work = dir.join("upgrade");
    std::fs::create_dir_all(&work)?;
    eprintln!("bench: upgrade: making the image…");
    let (setup, v1) = Setup::make(&work)?;
    full_image(&setup, &v1, runs, rows)?;
    delta(&setup, v1, rows)?;
    std::fs::remove_dir_all(&work)?;
    Ok(())
}

/// What the comparisons share, all under `work`: the image v1 as raw bytes and as our
/// bundle (signed by `key`), slot A holding v1 and slot B zeroed.
struct Setup {
    work: PathBuf,
    /// How the image was made, for the rows.
    what_image: String,
    image: PathBuf,
    key: ed25519_dalek::SigningKey,
    bundle: PathBuf,
    slot_a: PathBuf,
    slot_b: PathBuf,
}

impl Setup {
    /// Makes the image and writes the files; returns the image's bytes too.
    fn make(work: &Path) -> Result<(Self, Vec<u8>)> {
        let (v1, what_image) = upgrade_image(work, SIZE)?;
        let image = work.join("v1.img");
        std::fs::write(&image, &v1)?;
        let key = ed25519_dalek::SigningKey::from_bytes(&[42u8; 32]);
        let bundle = work.join("v1.cairn");
        write_bundle(&bundle, &key, "1.0.0", &v1)?;
        let slot_a = work.join("slot-a.img");
        let slot_b = work.join("slot-b.img");
        std::fs::write(&slot_a, &v1)?;
        make_slot(&slot_b, SIZE)?;
        let setup = Setup {
            work: work.to_path_buf(),
            what_image,
            image,
            key,
            bundle,
            slot_a,
            slot_b,
        };
        Ok((setup, v1))
    }
}

/// Seconds each install took, by installer, over all runs.
struct Timings {
    ours_write: Vec<f64>,
    ours_total: Vec<f64>,
    dd: Vec<f64>,
    rauc: Vec<f64>,
    /// Why RAUC's runs stopped, when one failed.
    rauc_err: Option<String>,
    /// Whether every install started from a cold page cache.
    cold: bool,
}

/// The full image into slot B by ours, `dd` and RAUC: three rows.
fn full_image(setup: &Setup, v1: &[u8], runs: usize, rows: &mut Vec<Row>) -> Result<()> {
    let rauc = match Rauc::start(&setup.image, &setup.slot_a, &setup.slot_b) {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(why)) => Err(why),
        Err(e) => Err(format!("{e:#}")),
    };
    if let Err(why) = &rauc {
        eprintln!("bench: RAUC not measured: {why}");
    }
    let mut t = install_runs(setup, v1, runs, &rauc)?;
    // RAUC's service stops here; its version is all the rows need.
    let rauc = rauc.map(|r| r.version.clone());
    let (w, total, d) = (
        median(&mut t.ours_write),
        median(&mut t.ours_total),
        median(&mut t.dd),
    );
    let cache = if t.cold {
        "cold page cache (sync; drop_caches=3 before each run)"
    } else {
        "**warm cache** (drop_caches not allowed here)"
    };
    let method = format!(
        "{}; into a preallocated 256 MiB slot file on the same ext4 disk, written in place; {cache}; median of {runs}, order rotated run to run",
        setup.what_image
    );
    rows.push(row(
        "install 256 MiB into a raw file-backed slot: ours, write only (bundle open, manifest + index checked, every block checked then written, fdatasync every 32 MiB checkpoint as the agent's default)",
        format!("{w:.3} s ({:.0} MB/s)", SIZE as f64 / w / 1e6),
        ">= 0.95 of dd's throughput",
        format!(
            "`dd bs=4M conv=fsync,notrunc` of the same image bytes: {d:.3} s; ratio dd/ours {:.2}. {method}",
            d / w
        ),
    ));
    rows.push(row(
        "the same, write + verify (slot read back, every block hash checked against the signed index)",
        format!("{total:.3} s ({:.0} MB/s)", SIZE as f64 / total / 1e6),
        "—",
        format!("ratio dd/ours {:.2} (dd writes without any check)", d / total),
    ));
    rows.push(rauc_row(rauc, &mut t, d, total));
    Ok(())
}

/// `runs` rounds of one install each by ours, `dd` and RAUC (while it works), the order
/// rotated from round to round, each from a dropped page cache.
fn install_runs(
    setup: &Setup,
    v1: &[u8],
    runs: usize,
    rauc: &Result<Rauc, String>,
) -> Result<Timings> {
    let vk = setup.key.verifying_key();
    let mut t = Timings {
        ours_write: vec![],
        ours_total: vec![],
        dd: vec![],
        rauc: vec![],
        rauc_err: None,
        cold: true,
    };
    for run in 0..runs {
        eprintln!("bench: upgrade: install run {} of {runs}…", run + 1);
        for k in 0..3 {
            t.cold &= drop_caches();
            match (run + k) % 3 {
                0 => {
                    let o = install_ours(&setup.bundle, &vk, &setup.slot_b, None, CHECKPOINT)?;
                    t.ours_write.push(o.write.as_secs_f64());
                    t.ours_total.push(o.total.as_secs_f64());
                }
                1 => {
                    t.dd.push(dd(&setup.image, &setup.slot_b)?.as_secs_f64());
                    if run == 0 && !slot_holds(&setup.slot_b, v1)? {
                        bail!("dd left other bytes in the slot");
                    }
                }
                _ => {
                    if let (Ok(r), None) = (rauc, &t.rauc_err) {
                        match r.install() {
                            Ok(took) => {
                                t.rauc.push(took.as_secs_f64());
                                if run == 0 && !slot_holds(&setup.slot_b, v1)? {
                                    t.rauc_err = Some("RAUC left other bytes in the slot".into());
                                }
                            }
                            Err(e) => t.rauc_err = Some(format!("{e:#}")),
                        }
                    }
                }
            }
        }
    }
    Ok(t)
}

/// RAUC's row: its median install time beside dd's (`dd_s`) and ours write + verify
/// (`ours_s`), or why it was not measured. `rauc` is its version, or why it could not run.
fn rauc_row(rauc: Result<String, String>, t: &mut Timings, dd_s: f64, ours_s: f64) -> Row {
    let (figure, baseline) = match (rauc, t.rauc_err.take()) {
        (Err(why), _) => (
            "not measured".to_string(),
            format!("RAUC could not run: {why}"),
        ),
        (Ok(_), Some(why)) => ("failed".to_string(), format!("RAUC install failed: {why}")),
        (Ok(version), None) => {
            let r = median(&mut t.rauc);
            (
                format!("{r:.3} s"),
                format!(
                    "ratio dd/RAUC {:.2}; ours write+verify vs RAUC {:.2}. RAUC {} `rauc install` wall time on the client (service on a private D-Bus): plain bundle (squashfs of the same image) whose CMS signature over the whole bundle is checked before writing, loop-mounted, image copied into a `type=raw` slot (same slot file), slot marked primary by a `bootloader=custom` script; no read-back",
                    dd_s / r,
                    r / ours_s,
                    version
                ),
            )
        }
    };
    row(
        "RAUC: the same image into the same slot",
        figure,
        "—",
        baseline,
    )
}

/// v2 = v1 with 10% of its blocks rewritten, slot A holding v1: what ours fetches, then
/// what casync needs, with two chunk sizes.
fn delta(setup: &Setup, v1: Vec<u8>, rows: &mut Vec<Row>) -> Result<()> {
    eprintln!("bench: upgrade: delta…");
    let v2 = mutate_blocks(&v1, 0.10, 2);
    drop(v1);
    let image2 = setup.work.join("v2.img");
    std::fs::write(&image2, &v2)?;
    drop(v2);
    rows.push(delta_ours(setup, &image2)?);
    for (cs, label) in [
        (None, "default chunking (64 KiB average)"),
        (Some(4096), "`--chunk-size=4096`"),
    ] {
        let (fig, base) = match casync_new_bytes(&setup.image, &image2, cs, &setup.work) {
            Ok(Ok((bytes, chunks))) => (
                format!("{:.1}% of the image", percent(bytes)),
                format!(
                    "new chunks' uncompressed bytes, each counted once, from the two .caibx indexes; v2 has {chunks} chunks"
                ),
            ),
            Ok(Err(why)) => ("not measured".into(), why),
            Err(e) => ("failed".into(), format!("{e:#}")),
        };
        rows.push(row(
            &format!("casync, same change, {label}: new chunks v2 needs given v1's store"),
            fig,
            "—",
            base,
        ));
    }
    Ok(())
}

/// Our install of `image2` (bundled here) into slot B, blocks it shares with slot A
/// copied from there rather than fetched.
fn delta_ours(setup: &Setup, image2: &Path) -> Result<Row> {
    let bundle2 = setup.work.join("v2.cairn");
    {
        let v2 = std::fs::read(image2)?;
        write_bundle(&bundle2, &setup.key, "2.0.0", &v2)?;
    }
    drop_caches();
    let scan_start = Instant::now();
    let local = cairn_agent::upgrade::install::LocalBlocks::scan(&setup.slot_a, Some(SIZE))?;
    let scan = scan_start.elapsed();
    let vk = setup.key.verifying_key();
    let o = install_ours(&bundle2, &vk, &setup.slot_b, Some(&local), CHECKPOINT)?;
    Ok(row(
        "delta v1 -> v2 (10% of 4 KiB blocks rewritten at random): fetched from the source by ours, slot A holding v1",
        format!("{:.1}% of the image", percent(o.progress.downloaded)),
        "< 15%",
        format!(
            "copied from slot A {:.1}%; slot A scanned (LocalBlocks::scan) in {:.2} s, install + verify {:.2} s",
            percent(o.progress.copied),
            scan.as_secs_f64(),
            o.total.as_secs_f64()
        ),
    ))
}

/// `bytes` as a percentage of the image.
fn percent(bytes: u64) -> f64 {
    100.0 * bytes as f64 / SIZE as f64
}

/// Empties the page cache (we run as root); false when that is not allowed here.
fn drop_caches() -> bool {
    let synced = std::process::Command::new("sync")
        .status()
        .is_ok_and(|s| s.success());
    synced && std::fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// A 256 MiB ext4 image of random files (`mke2fs -d`), or random bytes when e2fsprogs
/// is missing; says which.
fn upgrade_image(dir: &Path, size: u64) -> Result<(Vec<u8>, String)> {
    use rand::{Rng, RngCore, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(256);
    let tree = dir.join("image-tree");
    let mut filled = 0u64;
    let budget = size * 3 / 4;
    let mut files = 0usize;
    while filled < budget && files < 10_000 {
        let sub = tree.join(format!("d{:02}", files % 16));
        std::fs::create_dir_all(&sub)?;
        let len = rng.gen_range(1u64..=4 << 20).min(budget - filled);
        let mut bytes = vec![0u8; len as usize];
        rng.fill_bytes(&mut bytes);
        std::fs::write(sub.join(format!("f{files:05}.bin")), &bytes)?;
        filled += len;
        files += 1;
    }
    let img = dir.join("image-ext4.img");
    let made = std::process::Command::new("mke2fs")
        .args([
            "-q",
            "-F",
            "-t",
            "ext4",
            "-b",
            "4096",
            "-E",
            "root_owner=0:0",
            "-d",
        ])
        .arg(&tree)
        .arg(&img)
        .arg(format!("{}k", size / 1024))
        .stdin(std::process::Stdio::null())
        .output();
    std::fs::remove_dir_all(&tree)?;
    match made {
        Ok(o) if o.status.success() => {
            let bytes = std::fs::read(&img)?;
            std::fs::remove_file(&img)?;
            if bytes.len() as u64 != size {
                bail!("mke2fs made {} bytes, not {size}", bytes.len());
            }
            let zero = bytes
                .chunks(4096)
                .filter(|c| c.iter().all(|&b| b == 0))
                .count();
            Ok((
                bytes,
                format!(
                    "ext4 image of {files} random files ({} MiB) made with `mke2fs -d -t ext4`; {:.0}% of its 4 KiB blocks are zero",
                    filled >> 20,
                    100.0 * zero as f64 / (size / 4096) as f64
                ),
            ))
        }
        other => {
            eprintln!("bench: mke2fs failed ({other:?}); using random bytes");
            let mut bytes = vec![0u8; size as usize];
            rng.fill_bytes(&mut bytes);
            Ok((bytes, "random bytes (mke2fs not available)".into()))
        }
    }
}

/// A release bundle of one `rootfs` payload, built by the hub's release builder (the
/// image is written next to it).
fn write_bundle(
    out: &Path,
    key: &ed25519_dalek::SigningKey,
    version: &str,
    rootfs: &[u8],
) -> Result<()> {
    let image = out.with_extension("payload");
    std::fs::write(&image, rootfs)?;
    let spec = cairn_hub::release::BuildSpec {
        version: version.into(),
        arch: std::env::consts::ARCH.into(),
        board: "bench".into(),
        inputs: vec![cairn_hub::release::BuildInput {
            name: "rootfs".into(),
            path: image.clone(),
        }],
        expected_pcrs: vec![],
        created_ms: 0,
    };
    cairn_hub::release::build(&spec, key, out, &mut |_| {})?;
    std::fs::remove_file(&image)?;
    Ok(())
}

/// What one install by our library took.
struct Ours {
    write: Duration,
    total: Duration,
    progress: cairn_agent::upgrade::install::Progress,
}

/// Installs payload 0 of `bundle` into `slot` as the agent does: manifest checked
/// against the release key, block index checked against the manifest, blocks checked
/// and written with a flush every `checkpoint_bytes`, then read back and verified.
fn install_ours(
    bundle: &Path,
    key: &ed25519_dalek::VerifyingKey,
    slot: &Path,
    local: Option<&cairn_agent::upgrade::install::LocalBlocks>,
    checkpoint_bytes: u64,
) -> Result<Ours> {
    use cairn_agent::upgrade::install::{
        BlockSource, BundleSource, PayloadJob, Progress, install_payload, verify_payload,
    };
    use cairn_sync_protocol::release::BlockIndex;
    let start = Instant::now();
    let mut source = BundleSource::open(bundle)?;
    let m = source.manifest().verify(&[*key])?;
    let payload = m.payloads.first().context("bundle has no payload")?;
    let index = BlockIndex::verified(payload, &source.index(0)?)?;
    let job = PayloadJob {
        payload,
        number: 0,
        index: &index,
        target: slot,
        local,
        checkpoint_bytes,
    };
    let progress = install_payload(&job, &mut source, Progress::default(), &mut |_| Ok(()))?;
    let write = start.elapsed();
    verify_payload(payload, &index, slot)?;
    Ok(Ours {
        write,
        total: start.elapsed(),
        progress,
    })
}

fn dd(image: &Path, slot: &Path) -> Result<Duration> {
    let start = Instant::now();
    let out = std::process::Command::new("dd")
        .arg(format!("if={}", image.display()))
        .arg(format!("of={}", slot.display()))
        .args(["bs=4M", "conv=fsync,notrunc", "status=none"])
        .output()
        .context("running dd")?;
    let took = start.elapsed();
    if !out.status.success() {
        bail!("dd failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(took)
}

/// A preallocated slot file of `len` bytes, written once (zeros) like a partition.
fn make_slot(path: &Path, len: u64) -> Result<()> {
    let f = std::fs::File::create(path)?;
    let zeros = vec![0u8; 4 << 20];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(zeros.len() as u64) as usize;
        std::os::unix::fs::FileExt::write_all_at(&f, &zeros[..n], at)?;
        at += n as u64;
    }
    f.sync_all()?;
    Ok(())
}

/// Whether the slot starts with exactly `want`.
fn slot_holds(slot: &Path, want: &[u8]) -> Result<bool> {
    let mut got = std::fs::read(slot)?;
    got.truncate(want.len());
    Ok(got == want)
}

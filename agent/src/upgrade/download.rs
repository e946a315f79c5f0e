//! Phases `downloading` and `written`: every payload of the release is written into
//! the target slot (marked unbootable first; blocks the running slot holds are copied,
//! the rest fetched; each payload resumes at its last checkpoint), then read back and
//! checked against the signed block indexes before a trial may be armed.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use cairn_sync_protocol::message::UpgradePhase;
use cairn_sync_protocol::release::{BlockIndex, Manifest, Payload, SignedManifest, Slot};

use super::install::{
    self, BlockSource, InstallError, LocalBlocks, PayloadJob, Progress, SourceError,
};
use super::{Ctx, Engine, EngineError, Job, Next, boot, source};

/// Why writing the slot stopped before its end.
enum Halt {
    /// The release source is not reachable: resume when a link exists.
    Offline,
    /// Stopped at a checkpoint, as asked ([`Ctx::stop`]): step again.
    Interrupted,
    /// The job fails, for this reason.
    Fail(String),
    /// The box itself failed.
    Engine(EngineError),
}

impl From<EngineError> for Halt {
    fn from(e: EngineError) -> Self {
        Self::Engine(e)
    }
}

/// The release source of a step, opened when first needed.
struct LazySource<'a> {
    signed: &'a SignedManifest,
    open: Option<Box<dyn BlockSource>>,
}

impl LazySource<'_> {
    /// The source, opened now if it is not yet (`Offline` if it cannot be).
    fn get(&mut self, ctx: &mut Ctx<'_>) -> Result<&mut dyn BlockSource, Halt> {
        if self.open.is_none() {
            self.open = (ctx.source)(self.signed);
        }
        match self.open.as_mut() {
            Some(s) => Ok(s.as_mut()),
            None => Err(Halt::Offline),
        }
    }
}

impl Engine {
    /// Phase `downloading`: marks the target slot unbootable, writes what is left of
    /// every payload, then records `written`.
    pub(super) fn download(
        &mut self,
        ctx: &mut Ctx<'_>,
        job: &mut Job,
    ) -> Result<Next, EngineError> {
        let (signed, m) = match job.manifest() {
            Ok(x) => x,
            Err(e) => return self.fail(ctx, job, format!("stored manifest unreadable: {e}")),
        };
        if !job.marked {
            // Before a single byte of the slot changes, no boot loader may pick it.
            self.boot
                .mark_unbootable(job.target)
                .map_err(self.boot_err())?;
            job.marked = true;
            self.save(ctx, job, false, &[])?;
        }
        if let Err(halt) = self.write_slot(ctx, job, &signed, &m) {
            return match halt {
                Halt::Offline => Ok(Next::Offline),
                Halt::Interrupted => Ok(Next::Again),
                Halt::Fail(reason) => self.fail(ctx, job, reason),
                Halt::Engine(e) => Err(e),
            };
        }
        job.phase = UpgradePhase::Written;
        self.save(ctx, job, true, &[])?;
        Ok(Next::Again)
    }

    /// Writes every payload into the target slot, each from its last checkpoint, and
    /// cuts file payloads to size.
    fn write_slot(
        &mut self,
        ctx: &mut Ctx<'_>,
        job: &mut Job,
        signed: &SignedManifest,
        m: &Manifest,
    ) -> Result<(), Halt> {
        self.check_room(m, job.target)?;
        let mut src = LazySource { signed, open: None };
        for (n, p) in m.payloads.iter().enumerate() {
            self.write_payload(ctx, job, m, n, p, &mut src)?;
        }
        // File payloads end where the payload ends (the old file may have been
        // longer). Idempotent: done again after a crash here.
        for p in &m.payloads {
            let name = p.name.to_string();
            if self.cfg.slots.is_file(&name, job.target) {
                let target = self.slot_path(&name, job.target);
                trim_file(&target, p.size).map_err(Halt::Fail)?;
            }
        }
        Ok(())
    }

    /// Room for every payload in `slot`, checked before anything is written.
    fn check_room(&self, m: &Manifest, slot: Slot) -> Result<(), Halt> {
        for p in &m.payloads {
            let Some(target) = self.cfg.slots.target(p.name.as_str(), slot) else {
                return Err(Halt::Fail(format!("no slot for payload {}", p.name)));
            };
            let file = self.cfg.slots.is_file(p.name.as_str(), slot);
            source::check_capacity(target, p.size, slot, file).map_err(Halt::Fail)?;
        }
        Ok(())
    }

    /// Writes what is left of payload `n` (`p`): blocks the running slot holds are
    /// copied, the rest fetched; the job is stored at every checkpoint.
    fn write_payload(
        &mut self,
        ctx: &mut Ctx<'_>,
        job: &mut Job,
        m: &Manifest,
        n: usize,
        p: &Payload,
        src: &mut LazySource<'_>,
    ) -> Result<(), Halt> {
        let prog = job.progress.get(n).copied().unwrap_or_default();
        if prog.blocks_done >= p.blocks() && p.blocks() > 0 {
            return Ok(());
        }
        let name = p.name.to_string();
        let target = self.slot_path(&name, job.target);
        let index = self.block_index(ctx, job.target, n, p, src)?;
        // Blocks the active slot holds are copied, not downloaded. Its index is
        // kept between steps: a download that resumes after a link loss does not
        // read the whole active slot again.
        let local = match self.local.take() {
            Some((n, l)) if n == name => Some(l),
            _ => self.local_blocks(&name),
        };
        let s = src.get(ctx)?;
        let pj = PayloadJob {
            payload: p,
            number: n as u8,
            index: &index,
            target: &target,
            local: local.as_ref(),
            checkpoint_bytes: self.cfg.checkpoint_bytes,
        };
        let started = Instant::now();
        let stop = ctx.stop;
        let mut cp_err: Option<EngineError> = None;
        let result = install::install_payload(&pj, s, prog, &mut |g| {
            if let Err(e) = self.checkpoint(ctx, job, m, n, g) {
                cp_err = Some(e);
                return Err(InstallError::Interrupted);
            }
            if stop.load(Ordering::Relaxed) {
                return Err(InstallError::Interrupted);
            }
            Ok(())
        });
        self.local = local.map(|l| (name.clone(), l));
        if let Some(e) = cp_err {
            return Err(Halt::Engine(e));
        }
        match result {
            Ok(g) => {
                tracing::info!(
                    payload = %name,
                    bytes = p.size,
                    downloaded = g.downloaded,
                    copied = g.copied,
                    ms = started.elapsed().as_millis() as u64,
                    "payload written"
                );
                Ok(())
            }
            Err(InstallError::Interrupted) => Err(Halt::Interrupted),
            Err(InstallError::Source(SourceError::Offline(e))) => {
                tracing::info!(error = %e, "release source went away; resuming at the last checkpoint");
                Err(Halt::Offline)
            }
            Err(e) => Err(Halt::Fail(e.to_string())),
        }
    }

    /// The block index of payload `n` (`p`) in `slot`: kept from an interrupted
    /// attempt, else fetched, checked against the manifest, and kept.
    fn block_index(
        &self,
        ctx: &mut Ctx<'_>,
        slot: Slot,
        n: usize,
        p: &Payload,
        src: &mut LazySource<'_>,
    ) -> Result<BlockIndex, Halt> {
        let index_file = self.index_path(slot, p.name.as_str());
        let saved = std::fs::read(&index_file)
            .ok()
            .and_then(|b| BlockIndex::verified(p, &b).ok());
        if let Some(index) = saved {
            return Ok(index);
        }
        let raw = match src.get(ctx)?.index(n as u8) {
            Ok(r) => r,
            Err(SourceError::Offline(e)) => {
                tracing::info!(error = %e, "release source offline; resuming later");
                return Err(Halt::Offline);
            }
            Err(e) => return Err(Halt::Fail(e.to_string())),
        };
        let index = BlockIndex::verified(p, &raw).map_err(|e| Halt::Fail(e.to_string()))?;
        boot::write_atomic(&index_file, &raw).map_err(self.boot_err())?;
        Ok(index)
    }

    /// A checkpoint of payload `n`: `g` is durable on the slot; the job records it
    /// (with a progress report when one is due).
    fn checkpoint(
        &mut self,
        ctx: &Ctx<'_>,
        job: &mut Job,
        m: &Manifest,
        n: usize,
        g: &Progress,
    ) -> Result<(), EngineError> {
        if let Some(slot) = job.progress.get_mut(n) {
            *slot = *g;
        }
        let report = self.progress_due(job, m);
        self.save(ctx, job, report, &[])
    }

    /// A progress report every 10% or 5 s, whichever is rarer.
    fn progress_due(&mut self, job: &Job, m: &Manifest) -> bool {
        let (done, total, _) = job.totals(m);
        let tenth = (total / 10).max(1);
        let due = match self.last_progress_report {
            None => true,
            Some((at, last)) => done >= last + tenth && at.elapsed() >= Duration::from_secs(5),
        };
        if due {
            self.last_progress_report = Some((Instant::now(), done));
        }
        due
    }

    /// Phase `written`: reads every payload back against its block index; `verified`,
    /// or written again (once), or failed.
    pub(super) fn verify(&mut self, ctx: &Ctx<'_>, job: &mut Job) -> Result<Next, EngineError> {
        let (_, m) = match job.manifest() {
            Ok(x) => x,
            Err(e) => return self.fail(ctx, job, format!("stored manifest unreadable: {e}")),
        };
        for p in &m.payloads {
            let name = p.name.to_string();
            let target = self.slot_path(&name, job.target);
            let index = std::fs::read(self.index_path(job.target, &name))
                .ok()
                .and_then(|b| BlockIndex::verified(p, &b).ok());
            let outcome = match index {
                Some(i) => install::verify_payload(p, &i, &target),
                None => Err(InstallError::VerifyFailed {
                    path: target.clone(),
                    what: "the block index kept for it is gone".into(),
                }),
            };
            if let Err(e) = outcome {
                job.verify_failures += 1;
                if job.verify_failures >= 2 {
                    return self.fail(ctx, job, e.to_string());
                }
                tracing::warn!(error = %e, "verification failed; writing the slot again");
                job.progress = vec![Progress::default(); m.payloads.len()];
                job.phase = UpgradePhase::Downloading;
                self.save(ctx, job, true, &[])?;
                return Ok(Next::Again);
            }
        }
        job.phase = UpgradePhase::Verified;
        self.save(ctx, job, true, &[])?;
        Ok(Next::Again)
    }

    /// The blocks of payload `name` in the running slot: from the index kept when
    /// this slot was written, else by reading and hashing it.
    fn local_blocks(&self, name: &str) -> Option<LocalBlocks> {
        let active = self.cfg.slots.target(name, self.booted)?;
        match std::fs::read(self.index_path(self.booted, name)) {
            Ok(index) => LocalBlocks::from_index(active, &index).ok(),
            Err(_) => LocalBlocks::scan(active, None).ok(),
        }
    }

    /// Where payload `name` goes in `slot` (checked to exist at admission).
    fn slot_path(&self, name: &str, slot: Slot) -> PathBuf {
        self.cfg
            .slots
            .target(name, slot)
            .map(Path::to_path_buf)
            .unwrap_or_default()
    }

    fn index_path(&self, slot: Slot, payload: &str) -> PathBuf {
        self.cfg
            .state_dir
            .join(format!("slot-{}.{payload}.index", slot.as_str()))
    }
}

/// Cuts `path` to `size` bytes and makes that durable.
fn trim_file(path: &Path, size: u64) -> Result<(), String> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| format!("opening {}: {e}", path.display()))?;
    let len = f
        .metadata()
        .map_err(|e| format!("reading {}: {e}", path.display()))?
        .len();
    if len != size {
        f.set_len(size)
            .and_then(|()| f.sync_all())
            .map_err(|e| format!("resizing {} to {size} bytes: {e}", path.display()))?;
    }
    Ok(())
}

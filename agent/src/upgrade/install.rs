//! Writing a payload into a slot: block by block, each block checked against the signed
//! block index before it is written, blocks the box already holds copied locally,
//! the rest fetched from a [`BlockSource`] (the hub over QUIC, or a bundle file).
//!
//! Progress is durable in whole checkpoints: the target is flushed (`fdatasync`), then
//! the caller records how many blocks are done. A restart resumes at the last
//! checkpoint; blocks past it are simply written again. Nothing is staged in a
//! temporary copy: bytes go from the source straight to the slot.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use cairn_sync_protocol::release::{
    BLOCK_SIZE, BlockIndex, BundleLayout, FetchWhat, MAX_FETCH_BLOCKS, Payload, SignedManifest,
};
use sha2::{Digest, Sha256};

const BS: u64 = BLOCK_SIZE as u64;

/// Why a source could not deliver.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// No link now; try again later (progress is kept).
    #[error("release source unavailable: {0}")]
    Offline(String),
    /// The source refused for good (unknown release, bad range).
    #[error("release source refused: {0}")]
    Refused(String),
}

/// Where blocks the box does not hold come from.
pub trait BlockSource: Send {
    /// Appends exactly the bytes of `what` of payload `payload` to `out`: its block
    /// index, or a run of its blocks (the last block of a payload may be short).
    fn read(&mut self, payload: u8, what: FetchWhat, out: &mut Vec<u8>) -> Result<(), SourceError>;

    /// Raw block index of payload `payload` (checked by the caller against the manifest).
    fn index(&mut self, payload: u8) -> Result<Vec<u8>, SourceError> {
        let mut out = Vec::new();
        self.read(payload, FetchWhat::Index, &mut out)?;
        Ok(out)
    }

    /// Appends blocks `first .. first + count` of payload `payload` to `out`.
    fn blocks(
        &mut self,
        payload: u8,
        first: u64,
        count: u32,
        out: &mut Vec<u8>,
    ) -> Result<(), SourceError> {
        self.read(payload, FetchWhat::Blocks { first, count }, out)
    }
}

/// Why installing a payload failed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The caller stopped the install at a checkpoint (progress is kept).
    #[error("install interrupted at a checkpoint")]
    Interrupted,
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "writing {path}: no space left on device; free space or give the slot a larger partition"
    )]
    NoSpace { path: PathBuf },
    #[error(
        "block {block} of payload {payload} does not match the signed block index (corrupted in transit or at the source); refused"
    )]
    CorruptBlock { payload: String, block: u64 },
    #[error("{0}")]
    Index(#[from] cairn_sync_protocol::release::ReleaseError),
    #[error(
        "slot contents at {path} do not match the signed manifest after writing ({what}); the slot stays unbootable"
    )]
    VerifyFailed { path: PathBuf, what: String },
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> InstallError + 'a {
    move |source| {
        if source.raw_os_error() == Some(28) {
            InstallError::NoSpace {
                path: path.to_path_buf(),
            }
        } else {
            InstallError::Io {
                op,
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

/// How far a payload is written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    /// Blocks `0 .. blocks_done` are written and flushed.
    pub blocks_done: u64,
    /// Bytes fetched from the source so far.
    pub downloaded: u64,
    /// Bytes copied from blocks the box already held.
    pub copied: u64,
}

/// Blocks the box already holds, by hash: a file (the active slot) and which of its
/// blocks has which hash prefix. Every copied block is checked against the full
/// hash, so a stale or colliding entry only costs a download.
pub struct LocalBlocks {
    file: File,
    path: PathBuf,
    by_hash: HashMap<u64, u64>,
}

fn prefix(h: &[u8]) -> u64 {
    u64::from_le_bytes(h.get(..8).and_then(|p| p.try_into().ok()).unwrap_or([0; 8]))
}

impl LocalBlocks {
    /// Indexes the first `len` bytes of `path` (or all of it) by reading and hashing it.
    pub fn scan(path: &Path, len: Option<u64>) -> Result<Self, InstallError> {
        let mut file = File::open(path).map_err(io("opening", path))?;
        let mut by_hash = HashMap::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut block = 0u64;
        let mut left = len.unwrap_or(u64::MAX);
        loop {
            let want = (buf.len() as u64).min(left) as usize;
            if want == 0 {
                break;
            }
            let n = read_full(&mut file, &mut buf[..want]).map_err(io("reading", path))?;
            if n == 0 {
                break;
            }
            for c in buf[..n].chunks(BS as usize) {
                if c.len() == BS as usize {
                    by_hash.entry(prefix(&Sha256::digest(c))).or_insert(block);
                }
                block += 1;
            }
            left -= n as u64;
            if n < want {
                break;
            }
        }
        Ok(Self {
            file,
            path: path.to_path_buf(),
            by_hash,
        })
    }

    /// Uses a stored block index of `path` (32-byte hashes, block by block) instead of
    /// hashing it.
    pub fn from_index(path: &Path, index: &[u8]) -> Result<Self, InstallError> {
        let file = File::open(path).map_err(io("opening", path))?;
        let mut by_hash = HashMap::with_capacity(index.len() / 32);
        for (i, h) in index.chunks_exact(32).enumerate() {
            by_hash.entry(prefix(h)).or_insert(i as u64);
        }
        Ok(Self {
            file,
            path: path.to_path_buf(),
            by_hash,
        })
    }

    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// What one payload install is given.
pub struct PayloadJob<'a> {
    pub payload: &'a Payload,
    /// Position of the payload in the manifest (for the source).
    pub number: u8,
    pub index: &'a BlockIndex,
    pub target: &'a Path,
    pub local: Option<&'a LocalBlocks>,
    /// Flush and checkpoint after about this many bytes.
    pub checkpoint_bytes: u64,
}

#[derive(Clone, Copy)]
enum Run {
    Local {
        from: u64,
    },
    Remote,
    /// Blocks the index says are all zeros (SHA-256 of 4096 zero bytes): written
    /// without reading or hashing anything.
    Zero,
    /// Same bytes as an earlier block of this payload, already written to the target.
    Written {
        from: u64,
    },
}

/// Writes blocks `start.blocks_done ..` of a payload. `checkpoint` is called after each
/// flush with the progress that is now durable on the target; an error from it stops
/// the install (e.g. the caller is shutting down).
pub fn install_payload(
    job: &PayloadJob<'_>,
    source: &mut dyn BlockSource,
    start: Progress,
    checkpoint: &mut dyn FnMut(&Progress) -> Result<(), InstallError>,
) -> Result<Progress, InstallError> {
    let mut slot = Target::open(job, start.blocks_done)?;
    let total = job.payload.blocks();
    let mut p = start;
    let flusher = slot
        .out
        .try_clone()
        .map_err(io("opening slot", job.target))?;
    std::thread::scope(|scope| -> Result<Progress, InstallError> {
        let mut flushes = Flushes::start(scope, flusher, job);
        let mut i = p.blocks_done;
        while i < total {
            let (kind, n) = slot.plan_run(i);
            let run_len = slot.run_len(i, n);
            slot.fill_run(source, kind, i, n, run_len, &mut p)?;
            slot.write_run(i, n)?;
            i += n;
            flushes.after_run(&p, i, run_len, checkpoint)?;
        }
        flushes.finish(checkpoint)?;
        // The last flush, in line: the payload is complete only when it is durable.
        crate::crashpoint::hit("slot: before flush");
        slot.out
            .sync_data()
            .map_err(io("flushing slot", job.target))?;
        p.blocks_done = total;
        checkpoint(&p)?;
        Ok(p)
    })
}

/// The target of one payload install: the open slot, and which blocks it holds.
struct Target<'j, 'a> {
    job: &'j PayloadJob<'a>,
    out: File,
    name: String,
    /// Blocks of this payload already in the target (by hash): zero blocks and other
    /// repeats are then written once and copied from there.
    written: HashMap<u64, u64>,
    /// The run being written.
    buf: Vec<u8>,
}

impl<'j, 'a> Target<'j, 'a> {
    /// Opens the target slot of `job`, holding blocks `0 .. blocks_done` from an
    /// earlier attempt.
    fn open(job: &'j PayloadJob<'a>, blocks_done: u64) -> Result<Self, InstallError> {
        let out = std::fs::OpenOptions::new()
            .write(true)
            .read(true)
            .create(true)
            .truncate(false)
            .open(job.target)
            .map_err(io("opening slot", job.target))?;
        let mut written: HashMap<u64, u64> = HashMap::new();
        for b in 0..blocks_done.min(job.payload.blocks()) {
            if let Some(h) = job.index.hash(b) {
                written.entry(prefix(h)).or_insert(b);
            }
        }
        Ok(Self {
            job,
            out,
            name: job.payload.name.to_string(),
            written,
            buf: Vec::with_capacity((MAX_FETCH_BLOCKS as u64 * BS) as usize),
        })
    }

    fn hash_of(&self, b: u64) -> [u8; 32] {
        self.job.index.hash(b).copied().unwrap_or([0; 32])
    }

    fn is_zero(&self, b: u64) -> bool {
        self.job.payload.block_len(b) == BLOCK_SIZE && self.hash_of(b) == zero_block_hash()
    }

    /// Bytes in blocks `i .. i + n`.
    fn run_len(&self, i: u64, n: u64) -> u64 {
        (i..i + n)
            .map(|b| u64::from(self.job.payload.block_len(b)))
            .sum()
    }

    /// Plans one run of blocks from `i` on, all from one place: where from, and how
    /// many blocks.
    fn plan_run(&self, i: u64) -> (Run, u64) {
        let job = self.job;
        let h = self.hash_of(i);
        let full = job.payload.block_len(i) == BLOCK_SIZE;
        let kind = if self.is_zero(i) {
            Run::Zero
        } else {
            match (
                full.then(|| self.written.get(&prefix(&h))).flatten(),
                full.then(|| job.local.and_then(|l| l.by_hash.get(&prefix(&h))))
                    .flatten(),
            ) {
                (Some(&w), _) => Run::Written { from: w },
                (None, Some(&l)) => Run::Local { from: l },
                (None, None) => Run::Remote,
            }
        };
        let mut n = 1u64;
        // Hashes in this remote run: a repeat ends it (and is copied once written).
        let mut in_run: std::collections::HashSet<u64> = std::collections::HashSet::new();
        if matches!(kind, Run::Remote) && full {
            in_run.insert(prefix(&h));
        }
        let total = job.payload.blocks();
        while i + n < total
            && n < u64::from(MAX_FETCH_BLOCKS)
            && self.extends(kind, i + n, n, &mut in_run)
        {
            n += 1;
        }
        (kind, n)
    }

    /// Whether block `b`, the `n`th after the start of a run of `kind`, comes from the
    /// same place and belongs to it.
    fn extends(
        &self,
        kind: Run,
        b: u64,
        n: u64,
        in_run: &mut std::collections::HashSet<u64>,
    ) -> bool {
        let local = self.job.local;
        let next = self.hash_of(b);
        let next_full = self.job.payload.block_len(b) == BLOCK_SIZE;
        match kind {
            Run::Zero => self.is_zero(b),
            Run::Remote if self.is_zero(b) => false,
            Run::Remote if next_full && !in_run.insert(prefix(&next)) => false,
            Run::Local { .. } if self.is_zero(b) => false,
            Run::Remote => {
                !next_full
                    || (!self.written.contains_key(&prefix(&next))
                        && local.is_none_or(|l| !l.by_hash.contains_key(&prefix(&next))))
            }
            Run::Local { from } => {
                next_full
                    && !self.written.contains_key(&prefix(&next))
                    && local
                        .and_then(|l| l.by_hash.get(&prefix(&next)))
                        .is_some_and(|&f| f == from + n)
            }
            Run::Written { .. } => false,
        }
    }

    /// Puts the `run_len` bytes of blocks `i .. i + n` in the buffer: zeros, copied
    /// from the running slot or from this one (checked), or fetched (checked).
    fn fill_run(
        &mut self,
        source: &mut dyn BlockSource,
        kind: Run,
        i: u64,
        n: u64,
        run_len: u64,
        p: &mut Progress,
    ) -> Result<(), InstallError> {
        self.buf.clear();
        let copied = match kind {
            Run::Zero => {
                self.buf.resize(run_len as usize, 0);
                true
            }
            Run::Remote => false,
            Run::Local { from } => self.copy_local(from, i, run_len),
            Run::Written { from } => self.copy_written(from, i)?,
        };
        if copied {
            p.copied += run_len;
        } else {
            // Not held (or the copy no longer holds what the index said): download.
            self.buf.clear();
            let count = if matches!(kind, Run::Written { .. }) {
                1
            } else {
                n as u32
            };
            fetch_checked(source, self.job, &self.name, i, count, &mut self.buf)?;
            p.downloaded += run_len;
        }
        Ok(())
    }

    /// Copies blocks from `from` in the running slot as blocks `i ..` (`run_len`
    /// bytes); whether they hold what the index says.
    fn copy_local(&mut self, from: u64, i: u64, run_len: u64) -> bool {
        self.buf.resize(run_len as usize, 0);
        match self.job.local.map(|l| (&l.file, &l.path)) {
            Some((f, path)) => {
                f.read_exact_at(&mut self.buf, from * BS)
                    .map_err(io("reading active slot", path))
                    .is_ok()
                    && blocks_match(self.job, i, &self.buf)
            }
            None => false,
        }
    }

    /// Copies block `from` of this slot, written earlier, as block `i`; whether it
    /// holds what the index says.
    fn copy_written(&mut self, from: u64, i: u64) -> Result<bool, InstallError> {
        self.buf.resize(BS as usize, 0);
        self.out
            .read_exact_at(&mut self.buf, from * BS)
            .map_err(io("reading back slot", self.job.target))?;
        Ok(blocks_match(self.job, i, &self.buf))
    }

    /// Writes the buffer as blocks `i .. i + n` and remembers where they are.
    fn write_run(&mut self, i: u64, n: u64) -> Result<(), InstallError> {
        self.out
            .write_all_at(&self.buf, i * BS)
            .map_err(io("writing slot", self.job.target))?;
        for b in i..i + n {
            if self.job.payload.block_len(b) == BLOCK_SIZE {
                let h = self.hash_of(b);
                self.written.entry(prefix(&h)).or_insert(b);
            }
        }
        Ok(())
    }
}

/// Checkpoints. Flushes run on a second thread while writing goes on (as the kernel
/// writes back behind dd); a checkpoint is recorded only once the flush that began
/// after its blocks were written has returned.
struct Flushes<'j> {
    target: &'j Path,
    total: u64,
    checkpoint_bytes: u64,
    /// Progress to make durable, to the flush thread.
    flush: std::sync::mpsc::Sender<Progress>,
    /// Progress made durable, from the flush thread.
    done: std::sync::mpsc::Receiver<std::io::Result<Progress>>,
    in_flight: bool,
    since_checkpoint: u64,
}

impl<'j> Flushes<'j> {
    /// Starts the flush thread on `file` (the target of `job`) in `scope`.
    fn start<'scope>(
        scope: &'scope std::thread::Scope<'scope, '_>,
        file: File,
        job: &'j PayloadJob<'_>,
    ) -> Self {
        let (flush_tx, flush_rx) = std::sync::mpsc::channel::<Progress>();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<std::io::Result<Progress>>();
        scope.spawn(move || {
            for snapshot in flush_rx {
                crate::crashpoint::hit("slot: before flush");
                let r = file.sync_data().map(|()| snapshot);
                if done_tx.send(r).is_err() {
                    return;
                }
            }
        });
        Self {
            target: job.target,
            total: job.payload.blocks(),
            checkpoint_bytes: job.checkpoint_bytes,
            flush: flush_tx,
            done: done_rx,
            in_flight: false,
            since_checkpoint: 0,
        }
    }

    /// After a run of `run_len` bytes that ends before block `i`: records the
    /// checkpoint whose flush returned, and starts the next flush when one is due.
    fn after_run(
        &mut self,
        p: &Progress,
        i: u64,
        run_len: u64,
        checkpoint: &mut dyn FnMut(&Progress) -> Result<(), InstallError>,
    ) -> Result<(), InstallError> {
        self.since_checkpoint += run_len;
        if let Ok(r) = self.done.try_recv() {
            self.in_flight = false;
            self.landed(r, checkpoint)?;
        }
        if self.since_checkpoint >= self.checkpoint_bytes && i < self.total && !self.in_flight {
            let mut snapshot = *p;
            snapshot.blocks_done = i;
            if self.flush.send(snapshot).is_ok() {
                self.in_flight = true;
            }
            self.since_checkpoint = 0;
        }
        Ok(())
    }

    /// Stops the flush thread, recording the flush still under way.
    fn finish(
        self,
        checkpoint: &mut dyn FnMut(&Progress) -> Result<(), InstallError>,
    ) -> Result<(), InstallError> {
        drop(self.flush);
        if self.in_flight
            && let Ok(r) = self.done.recv()
        {
            let done = r.map_err(io("flushing slot", self.target))?;
            checkpoint(&done)?;
        }
        Ok(())
    }

    /// Records a checkpoint whose flush returned.
    fn landed(
        &self,
        r: std::io::Result<Progress>,
        checkpoint: &mut dyn FnMut(&Progress) -> Result<(), InstallError>,
    ) -> Result<(), InstallError> {
        let done = r.map_err(io("flushing slot", self.target))?;
        checkpoint(&done)
    }
}

/// SHA-256 of a block of zeros.
fn zero_block_hash() -> [u8; 32] {
    static ZERO: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    *ZERO.get_or_init(|| Sha256::digest([0u8; BS as usize]).into())
}

/// Whether `bytes` are blocks `first..` as the index says. Large runs are hashed in
/// two halves on two threads: SHA-256 of every block is the work `dd` does not do, and
/// on fast storage it is what bounds an install.
fn blocks_match(job: &PayloadJob<'_>, first: u64, bytes: &[u8]) -> bool {
    const SPLIT: usize = 1 << 20;
    if bytes.len() >= 2 * SPLIT {
        let half_blocks = (bytes.len() / 2) / BS as usize;
        let (a, b) = bytes.split_at(half_blocks * BS as usize);
        return std::thread::scope(|s| {
            let other = s.spawn(|| blocks_match_serial(job, first + half_blocks as u64, b));
            let mine = blocks_match_serial(job, first, a);
            mine && other.join().unwrap_or(false)
        });
    }
    blocks_match_serial(job, first, bytes)
}

fn blocks_match_serial(job: &PayloadJob<'_>, first: u64, bytes: &[u8]) -> bool {
    let mut at = 0usize;
    let mut b = first;
    while at < bytes.len() {
        let len = job.payload.block_len(b) as usize;
        let Some(chunk) = bytes.get(at..at + len) else {
            return false;
        };
        if job.index.hash(b) != Some(&Sha256::digest(chunk).into()) {
            return false;
        }
        at += len;
        b += 1;
    }
    true
}

/// Fetches and checks a run; one retry for a corrupted transfer.
fn fetch_checked(
    source: &mut dyn BlockSource,
    job: &PayloadJob<'_>,
    name: &str,
    first: u64,
    count: u32,
    buf: &mut Vec<u8>,
) -> Result<(), InstallError> {
    let want: u64 = (first..first + u64::from(count))
        .map(|b| u64::from(job.payload.block_len(b)))
        .sum();
    for attempt in 0..2 {
        buf.clear();
        source.blocks(job.number, first, count, buf)?;
        if buf.len() as u64 == want && blocks_match(job, first, buf) {
            return Ok(());
        }
        tracing::warn!(
            payload = name,
            first,
            count,
            attempt,
            "fetched blocks do not match the signed index"
        );
    }
    let bad = (first..first + u64::from(count))
        .find(|&b| {
            let off = ((b - first) * BS) as usize;
            let len = job.payload.block_len(b) as usize;
            buf.get(off..off + len)
                .is_none_or(|c| job.index.hash(b) != Some(&Sha256::digest(c).into()))
        })
        .unwrap_or(first);
    Err(InstallError::CorruptBlock {
        payload: name.to_string(),
        block: bad,
    })
}

/// Reads the payload back from the slot and checks every block against the block
/// index. The index's digest is in the signed manifest, so this covers every byte in
/// one hashing pass (the whole-payload SHA-256 is for tools: `release verify`, the
/// hub at push time).
pub fn verify_payload(
    payload: &Payload,
    index: &BlockIndex,
    target: &Path,
) -> Result<(), InstallError> {
    let f = File::open(target).map_err(io("opening slot", target))?;
    let mut buf = vec![0u8; 4 << 20];
    let mut at = 0u64;
    while at < payload.size {
        let n = (payload.size - at).min(buf.len() as u64) as usize;
        f.read_exact_at(&mut buf[..n], at).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                InstallError::VerifyFailed {
                    path: target.to_path_buf(),
                    what: format!("slot ends before byte {}", payload.size),
                }
            } else {
                io("reading back slot", target)(e)
            }
        })?;
        for (k, c) in buf[..n].chunks(BS as usize).enumerate() {
            let b = at / BS + k as u64;
            if index.hash(b) != Some(&Sha256::digest(c).into()) {
                return Err(InstallError::VerifyFailed {
                    path: target.to_path_buf(),
                    what: format!("block {b} differs"),
                });
            }
        }
        at += n as u64;
    }
    Ok(())
}

/// A release bundle file as a block source (offline installs from a USB stick, the
/// benchmarks).
pub struct BundleSource {
    file: File,
    path: PathBuf,
    manifest: SignedManifest,
    layout: BundleLayout,
    sizes: Vec<(u64, u64)>,
}

impl BundleSource {
    /// Opens a bundle and reads its manifest (not yet verified: the engine verifies it
    /// with the device's trusted keys).
    pub fn open(path: &Path) -> Result<Self, InstallError> {
        let mut file = File::open(path).map_err(io("opening bundle", path))?;
        let mut head = vec![0u8; 20];
        read_full(&mut file, &mut head).map_err(io("reading bundle", path))?;
        let need = match BundleLayout::parse_header(&head)? {
            Some(_) => 20,
            None if head.len() >= 20 => {
                20 + u32::from_le_bytes([head[16], head[17], head[18], head[19]]) as usize
            }
            None => 20,
        };
        head.resize(need, 0);
        file.read_exact_at(&mut head, 0)
            .map_err(io("reading bundle manifest", path))?;
        let (manifest, hlen) =
            BundleLayout::parse_header(&head)?.ok_or_else(|| InstallError::VerifyFailed {
                path: path.to_path_buf(),
                what: "bundle is truncated inside its manifest".into(),
            })?;
        let m = manifest.decode_unverified()?;
        let layout = BundleLayout::new(&m, hlen);
        let sizes = m.payloads.iter().map(|p| (p.index_len(), p.size)).collect();
        Ok(Self {
            file,
            path: path.to_path_buf(),
            manifest,
            layout,
            sizes,
        })
    }

    pub fn manifest(&self) -> &SignedManifest {
        &self.manifest
    }

    fn section(&self, what: FetchWhat, payload: u8, out: &mut Vec<u8>) -> Result<(), SourceError> {
        let p = usize::from(payload);
        let (Some(&(index_at, data_at)), Some(&(index_len, size))) =
            (self.layout.sections.get(p), self.sizes.get(p))
        else {
            return Err(SourceError::Refused(format!(
                "bundle has no payload {payload}"
            )));
        };
        let (at, len) = match what {
            FetchWhat::Index => (index_at, index_len),
            FetchWhat::Blocks { first, count } => {
                let start = first * BS;
                let end = ((first + u64::from(count)) * BS).min(size);
                if start >= size || count == 0 {
                    return Err(SourceError::Refused(format!(
                        "blocks {first}+{count} are outside payload {payload}"
                    )));
                }
                (data_at + start, end - start)
            }
        };
        let old = out.len();
        out.resize(old + len as usize, 0);
        self.file
            .read_exact_at(&mut out[old..], at)
            .map_err(|e| SourceError::Refused(format!("reading {}: {e}", self.path.display())))
    }
}

impl BlockSource for BundleSource {
    fn read(&mut self, payload: u8, what: FetchWhat, out: &mut Vec<u8>) -> Result<(), SourceError> {
        self.section(what, payload, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_sync_protocol::Text;
    use cairn_sync_protocol::release::IndexBuilder;

    /// A source holding one payload in memory, counting what it served.
    struct Mem {
        bytes: Vec<u8>,
        index: Vec<u8>,
        served: u64,
        corrupt_block: Option<u64>,
    }

    impl BlockSource for Mem {
        fn read(&mut self, _: u8, what: FetchWhat, out: &mut Vec<u8>) -> Result<(), SourceError> {
            let FetchWhat::Blocks { first, count } = what else {
                out.extend_from_slice(&self.index);
                return Ok(());
            };
            let start = (first * BS) as usize;
            let end = (((first + u64::from(count)) * BS) as usize).min(self.bytes.len());
            let old = out.len();
            out.extend_from_slice(&self.bytes[start..end]);
            if let Some(b) = self.corrupt_block
                && (first..first + u64::from(count)).contains(&b)
            {
                out[old + ((b - first) * BS) as usize] ^= 1;
            }
            self.served += (end - start) as u64;
            Ok(())
        }
    }

    fn image() -> Vec<u8> {
        // Random blocks, a run of zero blocks, repeats of one block, a short tail.
        let mut v = Vec::new();
        let mut x: u32 = 7;
        for b in 0..300u32 {
            let block: Vec<u8> = match b {
                100..200 => vec![0; BS as usize],
                250..260 => vec![0xab; BS as usize],
                _ => (0..BS)
                    .map(|_| {
                        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                        (x >> 16) as u8
                    })
                    .collect(),
            };
            v.extend_from_slice(&block);
        }
        v.extend_from_slice(b"tail");
        v
    }

    fn install(
        src: &mut Mem,
        target: &Path,
        local: Option<&LocalBlocks>,
    ) -> Result<Progress, InstallError> {
        let mut b = IndexBuilder::new();
        b.update(&src.bytes);
        let (payload, index) = b.finish(Text::new("rootfs").unwrap());
        src.index = index.clone();
        let index = BlockIndex::verified(&payload, &index).unwrap();
        let job = PayloadJob {
            payload: &payload,
            number: 0,
            index: &index,
            target,
            local,
            checkpoint_bytes: 64 * 1024,
        };
        let mut checkpoints = Vec::new();
        let p = install_payload(&job, src, Progress::default(), &mut |g| {
            checkpoints.push(g.blocks_done);
            Ok(())
        })?;
        assert!(
            checkpoints.windows(2).all(|w| w[0] <= w[1]),
            "{checkpoints:?}"
        );
        assert_eq!(checkpoints.last(), Some(&payload.blocks()));
        verify_payload(&payload, &index, target)?;
        Ok(p)
    }

    #[test]
    fn zeros_and_repeats_are_not_downloaded_and_the_slot_matches() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("slot");
        // Old contents in the slot must not survive where the image has zeros.
        std::fs::write(&target, vec![0x55u8; 400 * BS as usize]).unwrap();
        let mut src = Mem {
            bytes: image(),
            index: vec![],
            served: 0,
            corrupt_block: None,
        };
        let p = install(&mut src, &target, None).unwrap();
        let written = std::fs::read(&target).unwrap();
        assert_eq!(&written[..src.bytes.len()], &src.bytes[..]);
        // 100 zero blocks written without fetching; 9 of 10 repeated blocks copied.
        let fetched_blocks = src.served.div_ceil(BS);
        assert_eq!(
            fetched_blocks,
            300 - 100 - 9 + 1,
            "served {} bytes",
            src.served
        );
        assert_eq!(p.downloaded, src.served);
    }

    #[test]
    fn blocks_the_active_slot_holds_are_copied_and_a_corrupt_block_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let active = d.path().join("a");
        let v1 = image();
        std::fs::write(&active, &v1).unwrap();
        let mut v2 = v1.clone();
        v2[5 * BS as usize] ^= 0xff;
        v2[290 * BS as usize] ^= 0xff;
        let local = LocalBlocks::scan(&active, None).unwrap();
        let mut src = Mem {
            bytes: v2.clone(),
            index: vec![],
            served: 0,
            corrupt_block: None,
        };
        let target = d.path().join("b");
        install(&mut src, &target, Some(&local)).unwrap();
        assert_eq!(
            src.served,
            2 * BS + 4,
            "only the two changed blocks (and the short tail) are fetched"
        );
        assert_eq!(std::fs::read(&target).unwrap(), v2);

        let mut bad = Mem {
            bytes: v2,
            index: vec![],
            served: 0,
            corrupt_block: Some(290),
        };
        let e = install(&mut bad, &d.path().join("c"), Some(&local)).unwrap_err();
        assert!(
            matches!(e, InstallError::CorruptBlock { block: 290, .. }),
            "{e}"
        );
    }
}

//! OS release bundles on the operator's and the hub's side: release key files, building a
//! bundle from images, verifying a bundle as a stream of bytes (a file, or a push to the
//! admin API), and the trusted-key text formats.
//!
//! The bundle format itself ([`BundleLayout`]) and the manifest are wire types and live
//! in `cairn-sync-protocol`; this module only reads and writes them. Nothing here holds a
//! whole image in memory: building reads each image twice (once through the
//! [`IndexBuilder`], once to copy it, checked again while copying), and verifying keeps a
//! few running digests.
//!
//! Release key files: the private key is PKCS#8 (RFC 8410, ed25519) in PEM
//! (`-----BEGIN PRIVATE KEY-----`), mode 0600; `release keygen` also writes `FILE.pub`
//! with the public key as 64 hex digits. Public keys are accepted as 64 hex digits, as
//! a file holding them, as a `PUBLIC KEY` PEM (SPKI), or as the private key file.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use base64::Engine;
use cairn_sync_protocol::Text;
use cairn_sync_protocol::release::{
    BLOCK_SIZE, BundleLayout, IndexBuilder, KeyId, MAX_MANIFEST_LEN, Manifest, ReleaseError,
    ReleaseId, SignedManifest, parse_version,
};
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey};
use ed25519_dalek::{SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

/// What was wrong with a bundle, a key file or a build. Each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Release(#[from] ReleaseError),
    /// The bundle's bytes do not match its manifest.
    #[error("bundle is corrupt: {0}")]
    Corrupt(String),
    /// A key file or key text is unusable.
    #[error("{0}")]
    Key(String),
    /// The build's inputs are unusable.
    #[error("{0}")]
    Input(String),
}

pub type Result<T, E = BundleError> = std::result::Result<T, E>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BundleError + '_ {
    move |source| BundleError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Hex of a key id or digest.
pub fn hex32(b: &[u8]) -> String {
    hex::encode(b)
}

// ---------------------------------------------------------------- keys

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut s = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        s.push_str(&String::from_utf8_lossy(line));
        s.push('\n');
    }
    s.push_str(&format!("-----END {label}-----\n"));
    s
}

fn unpem(text: &str, label: &str) -> Option<Vec<u8>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin)? + begin.len();
    let stop = text[start..].find(&end)? + start;
    let body: String = text[start..stop]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD.decode(body).ok()
}

/// Writes a new private release key to `path` (created, never overwritten, mode 0600)
/// and its public key as hex to `path.pub`. A missing parent directory is created, mode
/// 0700 (a key directory is for secrets).
pub fn write_signing_key(path: &Path, key: &SigningKey) -> Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(dir) = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty() && !d.exists())
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir))?;
    }
    let der = key
        .to_pkcs8_der()
        .map_err(|e| BundleError::Key(format!("encoding the key: {e}")))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                BundleError::Key(format!(
                    "{} exists; keygen never overwrites a key: choose another path",
                    path.display()
                ))
            } else {
                io(path)(e)
            }
        })?;
    f.write_all(pem("PRIVATE KEY", der.as_bytes()).as_bytes())
        .map_err(io(path))?;
    f.sync_all().map_err(io(path))?;
    let mut pub_path = path.as_os_str().to_owned();
    pub_path.push(".pub");
    let pub_path = PathBuf::from(pub_path);
    std::fs::write(
        &pub_path,
        format!("{}\n", hex::encode(key.verifying_key().as_bytes())),
    )
    .map_err(io(&pub_path))?;
    Ok(pub_path)
}

/// Reads a private release key written by [`write_signing_key`].
pub fn read_signing_key(path: &Path) -> Result<SigningKey> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let der = unpem(&text, "PRIVATE KEY").ok_or_else(|| {
        BundleError::Key(format!(
            "{} is not a PEM private key (-----BEGIN PRIVATE KEY-----); make one with `cairn-hub release keygen --out FILE`",
            path.display()
        ))
    })?;
    SigningKey::from_pkcs8_der(&der).map_err(|e| {
        BundleError::Key(format!(
            "{} is not an ed25519 PKCS#8 key: {e}",
            path.display()
        ))
    })
}

fn parse_hex_key(s: &str) -> Option<VerifyingKey> {
    let b: [u8; 32] = hex::decode(s.trim()).ok()?.try_into().ok()?;
    VerifyingKey::from_bytes(&b).ok()
}

/// A public release key from 64 hex digits, or from a file holding them, a
/// `PUBLIC KEY` PEM, or the private key (whose public half is taken).
pub fn parse_public_key(arg: &str) -> Result<VerifyingKey> {
    if let Some(k) = parse_hex_key(arg) {
        return Ok(k);
    }
    let path = Path::new(arg);
    if !path.exists() {
        return Err(BundleError::Key(format!(
            "{arg:?} is neither 64 hex digits of an ed25519 public key nor a file; give the hex `release keygen` printed or its FILE.pub"
        )));
    }
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    if let Some(k) = parse_hex_key(&text) {
        return Ok(k);
    }
    if let Some(der) = unpem(&text, "PUBLIC KEY") {
        return VerifyingKey::from_public_key_der(&der)
            .map_err(|e| BundleError::Key(format!("{arg}: not an ed25519 public key: {e}")));
    }
    if text.contains("PRIVATE KEY") {
        return Ok(read_signing_key(path)?.verifying_key());
    }
    Err(BundleError::Key(format!(
        "{arg} holds no public key: expected 64 hex digits or a PUBLIC KEY PEM"
    )))
}

// ---------------------------------------------------------------- build

/// One input of a build.
#[derive(Debug, Clone)]
pub struct BuildInput {
    /// `rootfs`, `kernel`, `uki`, …
    pub name: String,
    pub path: PathBuf,
}

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildSpec {
    pub version: String,
    pub arch: String,
    pub board: String,
    /// The rootfs first, then the other payloads in this order.
    pub inputs: Vec<BuildInput>,
    pub expected_pcrs: Vec<(u8, [u8; 32])>,
    pub created_ms: u64,
}

/// A built (or verified) bundle.
#[derive(Debug, Clone)]
pub struct BundleInfo {
    pub signed: SignedManifest,
    pub manifest: Manifest,
    pub layout: BundleLayout,
    pub header_len: u64,
    /// Whether the signature was checked against a trusted key.
    pub signature_checked: bool,
}

impl BundleInfo {
    pub fn id(&self) -> ReleaseId {
        self.signed.id()
    }
}

const COPY_BUF: usize = 1024 * 1024;

fn text<const N: usize>(what: &str, s: &str) -> Result<Text<N>> {
    Text::new(s).map_err(|e| BundleError::Input(format!("{what} {s:?}: {e}")))
}

/// Parses `INDEX=HEX` (a sha256 PCR value).
pub fn parse_expect_pcr(s: &str) -> Result<(u8, [u8; 32])> {
    let bad = || {
        BundleError::Input(format!(
            "--expect-pcr {s:?}: write INDEX=HEX with INDEX 0-23 and 64 hex digits (sha256), e.g. 4=9a1c…"
        ))
    };
    let (i, v) = s.split_once('=').ok_or_else(bad)?;
    let i: u8 = i.trim().parse().map_err(|_| bad())?;
    if i > 23 {
        return Err(bad());
    }
    let v: [u8; 32] = hex::decode(v.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(bad)?;
    Ok((i, v))
}

/// Builds a bundle at `out` (written to `out.tmp`, synced, then renamed). `progress` is
/// called with byte counts as inputs are read; the total is twice the inputs' size.
pub fn build(
    spec: &BuildSpec,
    key: &SigningKey,
    out: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<BundleInfo> {
    parse_version(&spec.version)?;
    if spec.inputs.first().is_none_or(|i| i.name != "rootfs") {
        return Err(BundleError::Input(
            "the first payload must be the rootfs image".into(),
        ));
    }
    let mut payloads = Vec::new();
    let mut indexes = Vec::new();
    let mut buf = vec![0u8; COPY_BUF];
    for input in &spec.inputs {
        let name = text::<32>("payload name", &input.name)?;
        let mut f = std::fs::File::open(&input.path).map_err(io(&input.path))?;
        let mut b = IndexBuilder::new();
        loop {
            let n = f.read(&mut buf).map_err(io(&input.path))?;
            if n == 0 {
                break;
            }
            b.update(&buf[..n]);
            progress(n as u64);
        }
        let (p, index) = b.finish(name);
        payloads.push(p);
        indexes.push(index);
    }
    let manifest = Manifest {
        version: text("version", &spec.version)?,
        arch: text("arch", &spec.arch)?,
        board: text("board", &spec.board)?,
        created_ms: spec.created_ms,
        payloads,
        expected_pcrs: spec.expected_pcrs.clone(),
    };
    manifest.check()?;
    let signed = manifest.sign(key);
    if signed.body.len() > MAX_MANIFEST_LEN {
        return Err(ReleaseError::TooLarge {
            len: signed.body.len(),
        }
        .into());
    }
    let header = BundleLayout::header(&signed);
    let layout = BundleLayout::new(&manifest, header.len() as u64);

    let mut tmp_name = out.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let result = (|| -> Result<()> {
        let file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        let mut w = std::io::BufWriter::with_capacity(COPY_BUF, file);
        let mut at = 0u64;
        let pad_to = |w: &mut std::io::BufWriter<std::fs::File>, at: &mut u64, to: u64| {
            let zeros = [0u8; BLOCK_SIZE as usize];
            while *at < to {
                let n = (to - *at).min(u64::from(BLOCK_SIZE)) as usize;
                w.write_all(&zeros[..n]).map_err(io(&tmp))?;
                *at += n as u64;
            }
            Ok::<(), BundleError>(())
        };
        w.write_all(&header).map_err(io(&tmp))?;
        at += header.len() as u64;
        for (i, input) in spec.inputs.iter().enumerate() {
            let (index_at, data_at) = layout.sections[i];
            let p = &manifest.payloads[i];
            pad_to(&mut w, &mut at, index_at)?;
            w.write_all(&indexes[i]).map_err(io(&tmp))?;
            at += indexes[i].len() as u64;
            pad_to(&mut w, &mut at, data_at)?;
            let mut f = std::fs::File::open(&input.path).map_err(io(&input.path))?;
            let mut whole = Sha256::new();
            let mut copied = 0u64;
            loop {
                let n = f.read(&mut buf).map_err(io(&input.path))?;
                if n == 0 {
                    break;
                }
                whole.update(&buf[..n]);
                w.write_all(&buf[..n]).map_err(io(&tmp))?;
                copied += n as u64;
                progress(n as u64);
            }
            if copied != p.size || <[u8; 32]>::from(whole.finalize()) != p.sha256 {
                return Err(BundleError::Input(format!(
                    "{} changed while the bundle was being built; build again when nothing writes to it",
                    input.path.display()
                )));
            }
            at += copied;
        }
        pad_to(&mut w, &mut at, layout.len)?;
        let file = w.into_inner().map_err(|e| io(&tmp)(e.into_error()))?;
        file.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, out).map_err(io(out))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    Ok(BundleInfo {
        header_len: header.len() as u64,
        signed,
        manifest,
        layout,
        signature_checked: true,
    })
}

// ---------------------------------------------------------------- verify

#[derive(Debug, Clone, Copy)]
enum Region {
    Index(usize),
    Data(usize),
}

/// Running digests of one payload.
#[derive(Default)]
struct PayloadCheck {
    index: Sha256,
    whole: Sha256,
    block: Sha256,
    block_fill: u32,
    blocks: Sha256,
}

struct Parsed {
    info: BundleInfo,
    /// `(start, end, region)` in file order.
    regions: Vec<(u64, u64, Region)>,
    checks: Vec<PayloadCheck>,
}

/// Verifies a bundle fed as a stream of byte chunks: the header and signature first (as
/// soon as the manifest has arrived), then every index and payload digest as each
/// section ends, zero padding, and the exact length at [`finish`](Self::finish).
pub struct BundleVerifier {
    /// `None`: structure and digests only, no signature check.
    trusted: Option<Vec<VerifyingKey>>,
    head: Vec<u8>,
    parsed: Option<Parsed>,
    pos: u64,
    next_region: usize,
}

impl BundleVerifier {
    pub fn new(trusted: Option<Vec<VerifyingKey>>) -> Self {
        Self {
            trusted,
            head: Vec::new(),
            parsed: None,
            pos: 0,
            next_region: 0,
        }
    }

    /// The bundle's manifest, once its header has arrived (and verified, with keys).
    pub fn header(&self) -> Option<&BundleInfo> {
        self.parsed.as_ref().map(|p| &p.info)
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> u64 {
        self.pos + self.head.len() as u64
    }

    pub fn update(&mut self, bytes: &[u8]) -> Result<()> {
        if self.parsed.is_some() {
            return self.feed(bytes);
        }
        self.head.extend_from_slice(bytes);
        let Some((signed, header_len)) = BundleLayout::parse_header(&self.head)? else {
            return Ok(());
        };
        let (manifest, checked) = match &self.trusted {
            Some(keys) => (signed.verify(keys)?, true),
            None => {
                if signed.body.len() > MAX_MANIFEST_LEN {
                    return Err(ReleaseError::TooLarge {
                        len: signed.body.len(),
                    }
                    .into());
                }
                let m = signed.decode_unverified()?;
                m.check()?;
                (m, false)
            }
        };
        let layout = BundleLayout::new(&manifest, header_len);
        let mut regions = Vec::new();
        for (i, (p, &(index_at, data_at))) in
            manifest.payloads.iter().zip(&layout.sections).enumerate()
        {
            regions.push((index_at, index_at + p.index_len(), Region::Index(i)));
            regions.push((data_at, data_at + p.size, Region::Data(i)));
        }
        let checks = manifest
            .payloads
            .iter()
            .map(|_| PayloadCheck::default())
            .collect();
        self.parsed = Some(Parsed {
            info: BundleInfo {
                signed,
                manifest,
                layout,
                header_len,
                signature_checked: checked,
            },
            regions,
            checks,
        });
        let rest = self.head.split_off(header_len as usize);
        self.head = Vec::new();
        self.pos = header_len;
        // Empty sections end right where they start: check them as they are passed.
        self.close_regions()?;
        self.feed(&rest)
    }

    fn feed(&mut self, mut bytes: &[u8]) -> Result<()> {
        while !bytes.is_empty() {
            let Some(p) = self.parsed.as_mut() else {
                return Ok(());
            };
            let len = p.info.layout.len;
            if self.pos >= len {
                return Err(BundleError::Corrupt(format!(
                    "{} bytes after the end of the bundle ({len} bytes): not a file `release build` wrote",
                    bytes.len()
                )));
            }
            let take;
            match p.regions.get(self.next_region).copied() {
                Some((start, end, region)) if self.pos >= start => {
                    take = (end - self.pos).min(bytes.len() as u64) as usize;
                    let chunk = &bytes[..take];
                    match region {
                        Region::Index(i) => p.checks[i].index.update(chunk),
                        Region::Data(i) => data(&mut p.checks[i], chunk),
                    }
                }
                next => {
                    let until = next.map_or(len, |(s, _, _)| s);
                    take = (until - self.pos).min(bytes.len() as u64) as usize;
                    if let Some(off) = bytes[..take].iter().position(|&b| b != 0) {
                        return Err(BundleError::Corrupt(format!(
                            "non-zero byte in the padding at offset {}",
                            self.pos + off as u64
                        )));
                    }
                }
            }
            self.pos += take as u64;
            bytes = &bytes[take..];
            self.close_regions()?;
        }
        Ok(())
    }

    /// Checks every section that ends at or before the current position.
    fn close_regions(&mut self) -> Result<()> {
        let Some(p) = self.parsed.as_mut() else {
            return Ok(());
        };
        while let Some(&(_, end, region)) = p.regions.get(self.next_region) {
            if end > self.pos {
                break;
            }
            self.next_region += 1;
            match region {
                Region::Index(i) => {
                    let pl = &p.info.manifest.payloads[i];
                    let got: [u8; 32] = std::mem::take(&mut p.checks[i].index).finalize().into();
                    if got != pl.index_sha256 {
                        return Err(BundleError::Corrupt(format!(
                            "the block index of payload {} does not match the signed manifest",
                            pl.name
                        )));
                    }
                }
                Region::Data(i) => {
                    let pl = &p.info.manifest.payloads[i];
                    let c = &mut p.checks[i];
                    if c.block_fill > 0 {
                        let h = std::mem::take(&mut c.block).finalize();
                        c.blocks.update(h);
                        c.block_fill = 0;
                    }
                    let whole: [u8; 32] = std::mem::take(&mut c.whole).finalize().into();
                    if whole != pl.sha256 {
                        return Err(BundleError::Corrupt(format!(
                            "payload {} ({} bytes) has sha256 {}, the signed manifest says {}",
                            pl.name,
                            pl.size,
                            hex::encode(whole),
                            hex::encode(pl.sha256)
                        )));
                    }
                    let blocks: [u8; 32] = std::mem::take(&mut c.blocks).finalize().into();
                    if blocks != pl.index_sha256 {
                        return Err(BundleError::Corrupt(format!(
                            "the blocks of payload {} do not match its block index",
                            pl.name
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// Call at the end of the stream.
    pub fn finish(self) -> Result<BundleInfo> {
        let Some(p) = self.parsed else {
            return Err(BundleError::Corrupt(format!(
                "the stream ended inside the bundle header ({} bytes); is this a whole .cairn file?",
                self.head.len()
            )));
        };
        if self.pos < p.info.layout.len {
            return Err(BundleError::Corrupt(format!(
                "truncated: {} of {} bytes",
                self.pos, p.info.layout.len
            )));
        }
        Ok(p.info)
    }
}

fn data(c: &mut PayloadCheck, mut chunk: &[u8]) {
    c.whole.update(chunk);
    while !chunk.is_empty() {
        let take = ((BLOCK_SIZE - c.block_fill) as usize).min(chunk.len());
        c.block.update(&chunk[..take]);
        c.block_fill += take as u32;
        chunk = &chunk[take..];
        if c.block_fill == BLOCK_SIZE {
            let h = std::mem::take(&mut c.block).finalize();
            c.blocks.update(h);
            c.block_fill = 0;
        }
    }
}

/// Verifies a bundle file. `progress` gets byte counts as the file is read.
pub fn verify_file(
    path: &Path,
    trusted: Option<Vec<VerifyingKey>>,
    progress: &mut dyn FnMut(u64),
) -> Result<BundleInfo> {
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut v = BundleVerifier::new(trusted);
    let mut buf = vec![0u8; COPY_BUF];
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        v.update(&buf[..n])?;
        progress(n as u64);
    }
    v.finish()
}

/// Reads just the header of a bundle file (no digest checks).
pub fn read_header(path: &Path) -> Result<(SignedManifest, u64)> {
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut head = vec![0u8; 20];
    f.read_exact(&mut head).map_err(io(path))?;
    let len = u32::from_le_bytes([head[16], head[17], head[18], head[19]]) as usize;
    if len > MAX_MANIFEST_LEN + 256 {
        return Err(ReleaseError::TooLarge { len }.into());
    }
    head.resize(20 + len, 0);
    f.read_exact(&mut head[20..]).map_err(io(path))?;
    BundleLayout::parse_header(&head)?
        .ok_or_else(|| BundleError::Corrupt("header is truncated".into()))
}

/// A key's id as text.
pub fn key_id(key: &VerifyingKey) -> String {
    KeyId::of(key).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path, sizes: &[(&str, usize)]) -> BuildSpec {
        let inputs = sizes
            .iter()
            .map(|(name, n)| {
                let path = dir.join(name);
                let bytes: Vec<u8> = (0..*n).map(|i| (i * 7 % 253) as u8).collect();
                std::fs::write(&path, bytes).unwrap();
                BuildInput {
                    name: name.to_string(),
                    path,
                }
            })
            .collect();
        BuildSpec {
            version: "1.2.0".into(),
            arch: "x86_64".into(),
            board: "sim".into(),
            inputs,
            expected_pcrs: vec![(4, [1; 32])],
            created_ms: 7,
        }
    }

    #[test]
    fn built_bundles_verify_and_tampering_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::from_bytes(&[3; 32]);
        let out = dir.path().join("r.cairn");
        let s = spec(
            dir.path(),
            &[("rootfs", 3 * 4096 + 5), ("kernel", 0), ("uki", 4096)],
        );
        let mut seen = 0;
        let built = build(&s, &key, &out, &mut |n| seen += n).unwrap();
        assert_eq!(seen, 2 * (3 * 4096 + 5 + 4096));
        let bytes = std::fs::read(&out).unwrap();
        assert_eq!(bytes.len() as u64, built.layout.len);
        let ok = verify_file(&out, Some(vec![key.verifying_key()]), &mut |_| {}).unwrap();
        assert!(ok.signature_checked);
        assert_eq!(ok.id(), built.id());
        // Byte-at-a-time feeding gives the same answer.
        let mut v = BundleVerifier::new(None);
        for b in bytes.chunks(1) {
            v.update(b).unwrap();
        }
        assert!(!v.finish().unwrap().signature_checked);

        let check = |b: &[u8]| {
            let mut v = BundleVerifier::new(Some(vec![key.verifying_key()]));
            v.update(b)
                .and_then(|()| v.finish())
                .unwrap_err()
                .to_string()
        };
        let (index_at, data_at) = built.layout.sections[0];
        let mut t = bytes.clone();
        t[data_at as usize + 4100] ^= 1;
        assert!(check(&t).contains("payload rootfs"), "{}", check(&t));
        let mut t = bytes.clone();
        t[index_at as usize + 3] ^= 1;
        assert!(check(&t).contains("block index of payload rootfs"));
        let mut t = bytes.clone();
        t[30] ^= 1;
        assert!(!check(&t).is_empty());
        let mut t = bytes.clone();
        t[index_at as usize - 1] = 9;
        assert!(check(&t).contains("padding"));
        assert!(check(&bytes[..bytes.len() - 1]).contains("truncated"));
        let mut t = bytes.clone();
        t.push(0);
        assert!(check(&t).contains("after the end"));
        let other = SigningKey::from_bytes(&[4; 32]);
        let mut v = BundleVerifier::new(Some(vec![other.verifying_key()]));
        let e = v.update(&bytes).unwrap_err().to_string();
        assert!(e.contains("does not trust"), "{e}");
    }

    #[test]
    fn key_files_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::from_bytes(&[5; 32]);
        let path = dir.path().join("k.pem");
        let pub_path = write_signing_key(&path, &key).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(read_signing_key(&path).unwrap(), key);
        assert!(write_signing_key(&path, &key).is_err());
        let vk = key.verifying_key();
        assert_eq!(parse_public_key(pub_path.to_str().unwrap()).unwrap(), vk);
        assert_eq!(parse_public_key(path.to_str().unwrap()).unwrap(), vk);
        assert_eq!(parse_public_key(&hex::encode(vk.as_bytes())).unwrap(), vk);
        assert!(parse_public_key("nope").is_err());
    }
}

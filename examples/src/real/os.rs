//! OS upgrades in real mode: the orchestrator builds release bundles from the fleet's
//! image (each a mutation of the previous one), pushes them through the admin API with
//! an operator release key, assigns them, and judges what every box boots at the end.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use ed25519_dalek::SigningKey;
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};

/// The fleet's releases and the operator's release key.
pub struct OsFleet {
    dir: PathBuf,
    pub key: SigningKey,
    /// Image bytes by version ("1.0.0" is what the boxes were flashed with).
    pub images: BTreeMap<String, Vec<u8>>,
    last: String,
    seed: u64,
    pub key_added: bool,
}

impl OsFleet {
    /// Makes the 1.0.0 image (`kib` KiB of seeded random bytes) in `dir`; returns its
    /// path for the pools to flash.
    pub fn new(dir: &Path, kib: u64, seed: u64) -> Result<(Self, PathBuf)> {
        std::fs::create_dir_all(dir)?;
        let v1 = crate::random_image(seed, (kib * 1024) as usize);
        let path = dir.join("os-1.0.0.img");
        std::fs::write(&path, &v1).with_context(|| format!("writing {}", path.display()))?;
        let mut images = BTreeMap::new();
        images.insert("1.0.0".to_string(), v1);
        let mut key_seed = [0u8; 32];
        rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed).fill_bytes(&mut key_seed);
        Ok((
            Self {
                dir: dir.to_path_buf(),
                key: SigningKey::from_bytes(&key_seed),
                images,
                last: "1.0.0".into(),
                seed,
                key_added: false,
            },
            path,
        ))
    }

    /// Builds release `version` from the previous one with `changed` of its blocks
    /// rewritten (and a panicking kernel if `broken`); returns the bundle's path.
    pub fn build(&mut self, version: &str, changed: f64, broken: bool) -> Result<PathBuf> {
        let prev = self.images.get(&self.last).cloned().unwrap_or_default();
        let mut rng =
            rand::rngs::StdRng::seed_from_u64(self.seed ^ Sha256::digest(version)[0] as u64);
        let mut img = prev;
        let blocks = img.len() / 4096;
        let n = (blocks as f64 * changed).round() as usize;
        let mut idx: Vec<usize> = (0..blocks).collect();
        rand::seq::SliceRandom::shuffle(idx.as_mut_slice(), &mut rng);
        for &b in &idx[..n.min(blocks)] {
            rng.fill_bytes(&mut img[b * 4096..(b + 1) * 4096]);
        }
        if broken && img.len() >= 5 {
            img[..5].copy_from_slice(b"PANIC");
        }
        let image = self.dir.join(format!("os-{version}.img"));
        std::fs::write(&image, &img)?;
        let out = self.dir.join(format!("os-{version}.cairn"));
        let spec = cairn_hub::release::BuildSpec {
            version: version.into(),
            arch: std::env::consts::ARCH.into(),
            board: "sim".into(),
            inputs: vec![cairn_hub::release::BuildInput {
                name: "rootfs".into(),
                path: image,
            }],
            expected_pcrs: vec![],
            created_ms: cairn_hub::endpoint::now_ms(),
        };
        cairn_hub::release::build(&spec, &self.key, &out, &mut |_| {})
            .with_context(|| format!("building release {version}"))?;
        self.images.insert(version.to_string(), img);
        self.last = version.to_string();
        Ok(out)
    }

    /// SHA-256 (hex) of a version's image.
    pub fn sha256(&self, version: &str) -> Option<String> {
        self.images
            .get(version)
            .map(|i| hex::encode(Sha256::digest(i)))
    }
}

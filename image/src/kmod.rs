//! Kernel modules for the initramfs: the modules the box needs and everything they
//! depend on, in load order, read from each module's `.modinfo` section (the kernel
//! package ships no `modules.dep`; `depmod` would write one at install time).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use object::{Object, ObjectSection};

/// Every `.ko` under `dir`, by module name (`-` and `_` are the same to the kernel).
fn index(dir: &Path, out: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let e = e?;
        let p = e.path();
        if e.file_type()?.is_dir() {
            index(&p, out)?;
        } else if let Some(name) = p.file_name().and_then(|n| n.to_str()) {
            if let Some(m) = name.strip_suffix(".ko") {
                out.insert(m.replace('-', "_"), p);
            } else if name.ends_with(".ko.xz") || name.ends_with(".ko.zst") {
                bail!(
                    "{}: compressed modules are not supported; this builder expects the .ko files Debian 12 ships",
                    p.display()
                );
            }
        }
    }
    Ok(())
}

/// `depends=` of one module.
fn depends(path: &Path) -> Result<Vec<String>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let file = object::File::parse(&*bytes)
        .with_context(|| format!("{} is not an ELF object", path.display()))?;
    let Some(sec) = file.section_by_name(".modinfo") else {
        return Ok(Vec::new());
    };
    let data = sec
        .data()
        .with_context(|| format!("{}: .modinfo", path.display()))?;
    Ok(data
        .split(|b| *b == 0)
        .filter_map(|kv| std::str::from_utf8(kv).ok())
        .filter_map(|kv| kv.strip_prefix("depends="))
        .flat_map(|d| d.split(','))
        .filter(|d| !d.is_empty())
        .map(|d| d.replace('-', "_"))
        .collect())
}

/// The modules of `tree` (a `lib/modules/VERSION`) that `wanted` needs, dependencies
/// first. Names the kernel has built in (`modules.builtin`) are skipped; unknown names
/// are an error unless listed in `optional`.
pub fn closure(tree: &Path, wanted: &[&str], optional: &[&str]) -> Result<Vec<PathBuf>> {
    let mut all = BTreeMap::new();
    index(&tree.join("kernel"), &mut all)?;
    let builtin: BTreeSet<String> = std::fs::read_to_string(tree.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.rsplit('/').next())
        .filter_map(|n| n.strip_suffix(".ko"))
        .map(|n| n.replace('-', "_"))
        .collect();
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    // Depth-first, post-order: a module after everything it depends on.
    fn visit(
        name: &str,
        all: &BTreeMap<String, PathBuf>,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<PathBuf>,
        depth: usize,
    ) -> Result<()> {
        if depth > 64 {
            bail!("module dependencies of {name} nest deeper than 64: a cycle?");
        }
        if !seen.insert(name.to_string()) {
            return Ok(());
        }
        let path = &all[name];
        for d in depends(path)? {
            if all.contains_key(&d) {
                visit(&d, all, seen, order, depth + 1)?;
            }
        }
        order.push(path.clone());
        Ok(())
    }
    for w in wanted.iter().chain(optional) {
        let name = w.replace('-', "_");
        if builtin.contains(&name) {
            continue;
        }
        if !all.contains_key(&name) {
            if optional.contains(w) {
                continue;
            }
            bail!(
                "kernel module {w} is neither built in nor shipped in {}",
                tree.display()
            );
        }
        visit(&name, &all, &mut seen, &mut order, 0)?;
    }
    Ok(order)
}

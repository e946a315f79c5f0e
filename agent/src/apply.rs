//! Appliers: what makes one kind of resource true on the box.
//!
//! [`Applier`] is the seam for more resource kinds (services, containers); the first real
//! one is [`FileApplier`], which manages files below a configured root:
//! - a path is resolved strictly below the root: absolute paths are taken relative to
//!   it, and empty, `.` and `..` components are refused, as are parent directories
//!   that resolve (through symlinks) outside the root;
//! - a change is written to a temporary file in the same directory, given its mode and
//!   owner, fsynced, renamed over the target, and the directory fsynced: readers see
//!   the old or the new file, never a torn one, also across power loss;
//! - a file that already has the right content, mode and owner is left alone.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use cairn_sync_protocol::state::{FileResource, Resource};

/// What an applier found before it acted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Already as desired; nothing was touched.
    Unchanged,
    /// It was changed to match; `before` says how it differed.
    Changed { before: String },
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("path {path:?} is not allowed: {reason}")]
    BadPath { path: String, reason: String },
    #[error("resource kind {0} is not handled by this applier")]
    WrongKind(&'static str),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Makes resources of one kind true.
pub trait Applier {
    /// Brings the resource to its desired state, or reports that it already is.
    fn apply(&self, resource: &Resource) -> Result<Outcome, ApplyError>;
    /// Removes what an earlier apply created, given the path it recorded. `Ok(false)`
    /// when there was nothing to remove.
    fn remove(&self, recorded_path: &str) -> Result<bool, ApplyError>;
    /// Where a resource lives, for records and messages.
    fn locate(&self, resource: &Resource) -> Result<String, ApplyError>;
}

/// Manages files below `root`.
#[derive(Debug, Clone)]
pub struct FileApplier {
    root: PathBuf,
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ApplyError + 'a {
    move |source| ApplyError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

impl FileApplier {
    /// `root` is created if missing.
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, ApplyError> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(io("creating files root", &root))?;
        let root = fs::canonicalize(&root).map_err(io("resolving files root", &root))?;
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The absolute target of a resource path, refusing anything that leaves the root.
    pub fn resolve(&self, path: &str) -> Result<PathBuf, ApplyError> {
        let bad = |reason: &str| ApplyError::BadPath {
            path: path.to_string(),
            reason: reason.to_string(),
        };
        if path.contains('\0') {
            return Err(bad("contains a NUL byte"));
        }
        let rel = path.trim_start_matches('/');
        if rel.is_empty() {
            return Err(bad("is empty"));
        }
        if rel
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(bad("has an empty, '.' or '..' component"));
        }
        let mut out = self.root.clone();
        for c in Path::new(rel).components() {
            match c {
                Component::Normal(n) => out.push(n),
                _ => return Err(bad("is not a plain relative path")),
            }
        }
        Ok(out)
    }

    /// Checks that a directory, after following symlinks, lies below the root.
    fn check_inside(&self, dir: &Path, raw: &str) -> Result<PathBuf, ApplyError> {
        let real = fs::canonicalize(dir).map_err(io("resolving directory", dir))?;
        if !real.starts_with(&self.root) {
            return Err(ApplyError::BadPath {
                path: raw.to_string(),
                reason: format!(
                    "its directory resolves to {} outside the files root {}",
                    real.display(),
                    self.root.display()
                ),
            });
        }
        Ok(real)
    }

    /// Creates the parent directory one component at a time, checking each existing
    /// component (a symlinked directory could point elsewhere) before going deeper, so
    /// nothing is ever created outside the root.
    fn safe_parent(&self, target: &Path, raw: &str) -> Result<PathBuf, ApplyError> {
        let parent = target.parent().unwrap_or(&self.root);
        let rel = parent.strip_prefix(&self.root).unwrap_or(Path::new(""));
        let mut dir = self.root.clone();
        for c in rel.components() {
            dir.push(c);
            match fs::symlink_metadata(&dir) {
                Ok(_) => {
                    dir = self.check_inside(&dir, raw)?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    fs::create_dir(&dir).map_err(io("creating directory", &dir))?;
                }
                Err(e) => return Err(io("inspecting", &dir)(e)),
            }
        }
        self.check_inside(&dir, raw)
    }

    fn differs(&self, target: &Path, f: &FileResource) -> Result<Option<String>, ApplyError> {
        let meta = match fs::symlink_metadata(target) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Some("missing".into()));
            }
            Err(e) => return Err(io("inspecting", target)(e)),
        };
        if !meta.file_type().is_file() {
            return Ok(Some("not a regular file".into()));
        }
        if meta.len() != f.content.len() as u64 {
            return Ok(Some(format!(
                "size {} instead of {}",
                meta.len(),
                f.content.len()
            )));
        }
        let content = fs::read(target).map_err(io("reading", target))?;
        if content != f.content {
            return Ok(Some("content changed".into()));
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode != f.mode & 0o7777 {
            return Ok(Some(format!(
                "mode {mode:o} instead of {:o}",
                f.mode & 0o7777
            )));
        }
        if let Some(uid) = f.uid
            && meta.uid() != uid
        {
            return Ok(Some(format!("owner {} instead of {uid}", meta.uid())));
        }
        if let Some(gid) = f.gid
            && meta.gid() != gid
        {
            return Ok(Some(format!("group {} instead of {gid}", meta.gid())));
        }
        Ok(None)
    }

    fn write(&self, target: &Path, dir: &Path, f: &FileResource) -> Result<(), ApplyError> {
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.join(format!(".{name}.cairn-tmp"));
        let _ = fs::remove_file(&tmp);
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io("creating", &tmp))?;
        let result = (|| {
            file.write_all(&f.content).map_err(io("writing", &tmp))?;
            fs::set_permissions(&tmp, fs::Permissions::from_mode(f.mode & 0o7777))
                .map_err(io("setting mode of", &tmp))?;
            if f.uid.is_some() || f.gid.is_some() {
                std::os::unix::fs::chown(&tmp, f.uid, f.gid)
                    .map_err(io("changing owner of", &tmp))?;
            }
            file.sync_all().map_err(io("syncing", &tmp))?;
            let final_path = dir.join(&name);
            fs::rename(&tmp, &final_path).map_err(io("renaming into place", &final_path))?;
            fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io("syncing directory", dir))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }
}

impl Applier for FileApplier {
    fn apply(&self, resource: &Resource) -> Result<Outcome, ApplyError> {
        let Resource::File(f) = resource else {
            return Err(ApplyError::WrongKind(resource.kind()));
        };
        let target = self.resolve(f.path.as_str())?;
        let dir = self.safe_parent(&target, f.path.as_str())?;
        let target = dir.join(target.file_name().unwrap_or_default());
        match self.differs(&target, f)? {
            None => Ok(Outcome::Unchanged),
            Some(before) => {
                if fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir()) {
                    return Err(ApplyError::BadPath {
                        path: f.path.to_string(),
                        reason: "a directory is in the way".into(),
                    });
                }
                self.write(&target, &dir, f)?;
                Ok(Outcome::Changed { before })
            }
        }
    }

    fn remove(&self, recorded_path: &str) -> Result<bool, ApplyError> {
        let target = self.resolve(recorded_path)?;
        let Some(name) = target.file_name() else {
            return Ok(false);
        };
        // Resolve the real parent: a symlinked directory must not lead outside the root.
        let parent = target.parent().unwrap_or(&self.root);
        let dir = match self.check_inside(parent, recorded_path) {
            Ok(d) => d,
            Err(ApplyError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        let target = dir.join(name);
        match fs::symlink_metadata(&target) {
            Ok(m) if m.is_file() || m.file_type().is_symlink() => {
                fs::remove_file(&target).map_err(io("removing", &target))?;
                if let Some(dir) = target.parent() {
                    let _ = fs::File::open(dir).and_then(|d| d.sync_all());
                }
                Ok(true)
            }
            Ok(_) => Ok(false),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io("inspecting", &target)(e)),
        }
    }

    fn locate(&self, resource: &Resource) -> Result<String, ApplyError> {
        let Resource::File(f) = resource else {
            return Err(ApplyError::WrongKind(resource.kind()));
        };
        self.resolve(f.path.as_str())?;
        Ok(f.path.as_str().trim_start_matches('/').to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_sync_protocol::Text;

    fn file(path: &str, content: &str, mode: u32) -> Resource {
        Resource::File(FileResource {
            path: Text::new(path).unwrap(),
            content: content.into(),
            mode,
            uid: None,
            gid: None,
        })
    }

    #[test]
    fn applies_idempotently_and_restores_drift() {
        let dir = tempfile::tempdir().unwrap();
        let a = FileApplier::new(dir.path().join("root")).unwrap();
        let r = file("/etc/motd", "hello\n", 0o640);
        assert_eq!(
            a.apply(&r).unwrap(),
            Outcome::Changed {
                before: "missing".into()
            }
        );
        let p = a.root().join("etc/motd");
        assert_eq!(fs::read_to_string(&p).unwrap(), "hello\n");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o7777,
            0o640
        );
        assert_eq!(a.apply(&r).unwrap(), Outcome::Unchanged);

        fs::write(&p, "tampered").unwrap();
        assert!(matches!(a.apply(&r).unwrap(), Outcome::Changed { .. }));
        assert_eq!(fs::read_to_string(&p).unwrap(), "hello\n");

        fs::set_permissions(&p, fs::Permissions::from_mode(0o777)).unwrap();
        assert_eq!(
            a.apply(&r).unwrap(),
            Outcome::Changed {
                before: "mode 777 instead of 640".into()
            }
        );
        assert!(a.remove("etc/motd").unwrap());
        assert!(!p.exists());
        assert!(!a.remove("etc/motd").unwrap());
    }

    #[test]
    fn refuses_paths_outside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let a = FileApplier::new(dir.path().join("root")).unwrap();
        for bad in ["../escape", "a/../../b", "", "/", "a//b", "./x"] {
            assert!(
                matches!(
                    a.apply(&file(bad, "x", 0o644)),
                    Err(ApplyError::BadPath { .. })
                ),
                "{bad:?} must be refused"
            );
        }
        // A symlinked directory pointing outside is refused too.
        let outside = dir.path().join("outside");
        fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, a.root().join("link")).unwrap();
        let err = a.apply(&file("link/x", "x", 0o644)).unwrap_err();
        assert!(err.to_string().contains("outside the files root"), "{err}");
        assert!(!outside.join("x").exists());
        // Nor are directories created there, nor files removed there.
        let err = a.apply(&file("link/sub/x", "x", 0o644)).unwrap_err();
        assert!(err.to_string().contains("outside the files root"), "{err}");
        assert!(!outside.join("sub").exists());
        fs::write(outside.join("victim"), "keep").unwrap();
        assert!(a.remove("link/victim").is_err());
        assert!(outside.join("victim").exists());
    }
}

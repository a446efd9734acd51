//! Secret files: the JWT signing key, the libp2p identity, the key file with the data
//! keys. Created with mode 0600; refused when other users can read them.
//!
//! It must never log or return a secret's bytes in an error, and never widen a file's
//! permissions.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Fails if a secret file is readable or writable by the group or other users.
pub fn check_private(path: &Path) -> std::io::Result<()> {
    let mode = std::fs::metadata(path)?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{} holds secrets but its mode is {:o}: other users could read it; \
                 run `chmod 600 {}` and check who may have copied it",
                path.display(),
                mode & 0o777,
                path.display()
            ),
        ));
    }
    Ok(())
}

/// Reads the secret at `path`, creating it with `len` random bytes (mode 0600) if absent.
pub fn load_or_create(path: &Path, len: usize) -> std::io::Result<Vec<u8>> {
    match std::fs::read(path) {
        Ok(bytes) if bytes.len() >= len => {
            check_private(path)?;
            Ok(bytes)
        }
        Ok(_) => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} is shorter than {len} bytes; remove it to generate a new one", path.display()),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut bytes = vec![0u8; len];
            rand::fill(&mut bytes[..]);
            let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            Ok(bytes)
        }
        Err(e) => Err(e),
    }
}

/// Reads a secret text file, `None` if it does not exist; refuses one others can read.
pub fn read_private(path: &Path) -> std::io::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            check_private(path)?;
            Ok(Some(text))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Replaces a secret file atomically (a 0600 temp file, fsync, rename, fsync of the
/// directory), so a crash leaves either the old file or the new one.
pub fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_with_private_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        let a = load_or_create(&path, 32).unwrap();
        let b = load_or_create(&path, 32).unwrap();
        assert_eq!(a, b);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(load_or_create(&path, 64).is_err());
    }

    #[test]
    fn secrets_readable_by_others_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        assert_eq!(read_private(&path).unwrap(), None);
        write_private(&path, "{}").unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(read_private(&path).unwrap().as_deref(), Some("{}"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_private(&path).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
        assert!(err.to_string().contains("chmod 600"));
        assert!(load_or_create(&path, 2).is_err(), "a loose secret is refused, not silently fixed");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o644, "never changed");
    }
}

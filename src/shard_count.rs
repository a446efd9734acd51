//! The shard count a data directory's data was created with, kept in
//! `<data-dir>/shard_count`.
//!
//! A row's shard is `jump_hash(placement key, N)` (`crate::placement`), so the same data
//! started with another N would look for many rows on the wrong shard and answer 404
//! while they sit elsewhere. The count is therefore recorded when the data is created
//! and a start with any other count is refused, naming the recorded one. A data
//! directory from before the file existed is adopted: with the node's own PostgreSQL its
//! count is read off the `shard_<i>` databases it holds; with external shards the first
//! start records the count of the URLs it is given (nothing else knows it).
//!
//! This module decides; it never creates databases or moves rows. The count never
//! changes silently: there is no resize.

use std::path::{Path, PathBuf};

/// The file, in the data directory.
pub const FILE: &str = "shard_count";

/// Why a start may not use the shard count it was given.
#[derive(Debug, thiserror::Error)]
pub enum ShardCountError {
    #[error(
        "the data in {dir} was created with {recorded} shards ({source_of}), but this start asks for \
         {asked}: rows are placed by the shard count, so with {asked} shards many would not be found. \
         Start with --shards {recorded} (or {recorded} shard URLs); changing the shard count of \
         existing data is not supported"
    )]
    Mismatch { dir: PathBuf, recorded: usize, asked: usize, source_of: &'static str },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} should hold the shard count (a number from 1 to 64) but holds {text:?}; restore it")]
    Corrupt { path: PathBuf, text: String },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The path of the file in a data directory.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE)
}

/// The recorded count, if the data directory has one.
pub fn recorded(data_dir: &Path) -> Result<Option<usize>, ShardCountError> {
    let path = path(data_dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(ShardCountError::Read { path, source }),
    };
    match text.trim().parse::<usize>() {
        Ok(n) if (1..=64).contains(&n) => Ok(Some(n)),
        _ => Err(ShardCountError::Corrupt { path, text: text.chars().take(40).collect() }),
    }
}

/// The count this data directory holds: the recorded one, else `found` (what the data
/// itself shows, for a directory from before the file existed), else none (new data).
/// Refuses `asked` if it differs.
pub fn check(data_dir: &Path, asked: usize, found: Option<usize>) -> Result<(), ShardCountError> {
    let known = match recorded(data_dir)? {
        Some(n) => Some((n, "recorded in its shard_count file")),
        None => found.map(|n| (n, "counted from its shard databases")),
    };
    match known {
        Some((recorded, source_of)) if recorded != asked => {
            Err(ShardCountError::Mismatch { dir: data_dir.to_owned(), recorded, asked, source_of })
        }
        _ => Ok(()),
    }
}

/// Records `count` (after `check` passed and the shards exist). Written through a
/// temporary file and a rename, so a crash leaves the old file or the new one.
pub fn record(data_dir: &Path, count: usize) -> Result<(), ShardCountError> {
    let path = path(data_dir);
    if recorded(data_dir)? == Some(count) {
        return Ok(());
    }
    let tmp = path.with_extension("tmp");
    let write = std::fs::write(&tmp, format!("{count}\n")).and_then(|()| std::fs::rename(&tmp, &path));
    write.map_err(|source| ShardCountError::Write { path, source })
}

/// The shard count the node's own databases show: one more than the highest `i` of a
/// database named `shard_<i>`, or none if there is no such database (new data).
pub fn count_from_databases<S: AsRef<str>>(names: &[S]) -> Option<usize> {
    names
        .iter()
        .filter_map(|n| n.as_ref().strip_prefix("shard_")?.parse::<usize>().ok())
        .max()
        .map(|highest| highest + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_directory_takes_any_count_and_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        check(dir.path(), 4, None).unwrap();
        record(dir.path(), 4).unwrap();
        assert_eq!(recorded(dir.path()).unwrap(), Some(4));
        check(dir.path(), 4, None).unwrap();
        let err = check(dir.path(), 2, None).unwrap_err();
        assert!(matches!(err, ShardCountError::Mismatch { recorded: 4, asked: 2, .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains("created with 4 shards") && text.contains("--shards 4"), "{text}");
    }

    #[test]
    fn the_recorded_count_wins_over_what_the_databases_show() {
        let dir = tempfile::tempdir().unwrap();
        record(dir.path(), 3).unwrap();
        // A database left over from elsewhere does not change what was recorded.
        check(dir.path(), 3, Some(8)).unwrap();
        assert!(check(dir.path(), 8, Some(8)).is_err());
    }

    #[test]
    fn an_old_directory_is_judged_by_its_databases() {
        let dir = tempfile::tempdir().unwrap();
        let found = count_from_databases(&["postgres", "template1", "shard_0", "shard_3", "shard_1", "shard_2"]);
        assert_eq!(found, Some(4));
        check(dir.path(), 4, found).unwrap();
        let err = check(dir.path(), 2, found).unwrap_err();
        assert!(err.to_string().contains("counted from its shard databases"), "{err}");
        assert_eq!(count_from_databases(&["postgres", "shard_x", "shards"]), None);
    }

    #[test]
    fn a_damaged_file_is_an_error_not_a_guess() {
        let dir = tempfile::tempdir().unwrap();
        for text in ["", "four", "0", "65", "-1"] {
            std::fs::write(path(dir.path()), text).unwrap();
            assert!(matches!(recorded(dir.path()), Err(ShardCountError::Corrupt { .. })), "{text:?}");
            assert!(check(dir.path(), 4, None).is_err());
        }
    }
}

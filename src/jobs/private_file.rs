//! Files a command writes for its operator that hold full addresses (the
//! dry run's `--plan FILE`, the drift report's `--report FILE`): created
//! readable by their owner only.

use std::io::Write as _;
use std::path::Path;

use serde::Serialize;

/// Writes one JSON object a line to `path`, as a new file of mode 0600:
/// written beside the target and renamed over it, so a file already there
/// is replaced, never written into with its old, wider mode, and a failed
/// write leaves the old file whole.
pub fn write_json_lines<T: Serialize>(
    path: &Path,
    lines: impl IntoIterator<Item = T>,
) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let file = tempfile::NamedTempFile::new_in(dir)?;
    let mut out = std::io::BufWriter::new(file);
    for line in lines {
        serde_json::to_writer(&mut out, &line)?;
        out.write_all(b"\n")?;
    }
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.as_file().sync_all()?;
    file.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn lines_replace_a_wider_file_with_one_only_its_owner_reads() {
        // Arrange: a file already there, readable by everyone.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        std::fs::write(&path, "old\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();

        // Act
        write_json_lines(
            &path,
            [serde_json::json!({"a": 1}), serde_json::json!({"b": 2})],
        )
        .unwrap();

        // Assert
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"a\":1}\n{\"b\":2}\n"
        );
    }
}

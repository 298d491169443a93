//! The modules as layers (docs/architecture.md): a module may use only
//! modules on lower layers. Read from the source's own `crate::` paths, so
//! an import that runs upward — or sideways, between two modules of one
//! layer — fails here, naming the file and the line.

use std::path::{Path, PathBuf};

/// Each top-level module of `src/` and its layer, lowest first. A module
/// uses only modules of a lower layer. Changing a module's layer is a
/// design change: change docs/architecture.md with it.
const LAYERS: &[(&str, u8)] = &[
    // 1: leaves — plain types and helpers.
    ("domain", 1),
    ("stored_enums", 1),
    ("instance", 1),
    ("metrics", 1),
    ("redact", 1),
    ("schedule", 1),
    ("template", 1),
    // 2: settings and the state database.
    ("config", 2),
    ("state", 2),
    // 3: process plumbing and HTTP.
    ("lock", 3),
    ("cli", 3),
    ("remote", 3),
    ("telemetry", 3),
    // 4: the two clients, and what reads the state database for people.
    ("crm", 4),
    ("edm", 4),
    ("status", 4),
    ("ops_endpoint", 4),
    // 5: what both jobs share; the sandbox servers.
    ("jobs", 5),
    ("sandbox", 5),
    // 6: the jobs, and the commands built on one of them.
    ("sync", 6),
    ("writeback", 6),
    ("explain", 6),
    ("reload", 6),
    // 7: commands that run jobs.
    ("once", 7),
    ("demo", 7),
    ("check", 7),
    // 8, 9: the daemon, and the dispatch of every command.
    ("daemon", 8),
    ("app", 9),
];

fn layer(module: &str) -> Option<u8> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|(_, l)| *l)
}

/// The top-level module a source file belongs to (`src/sync/plan.rs` →
/// `sync`); `None` for the binaries and `lib.rs`.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?.to_string();
    let name = first.strip_suffix(".rs").unwrap_or(&first).to_string();
    (!["main", "lib", "bin"].contains(&name.as_str())).then_some(name)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of `text` before its test module (tests may use anything).
fn production_part(text: &str) -> &str {
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let starts_tests = line.trim_start().starts_with("#[cfg(")
            && line.contains("test")
            && lines
                .get(i + 1)
                .is_some_and(|next| next.trim_start().starts_with("mod "));
        if starts_tests {
            let end: usize = lines[..i].iter().map(|l| l.len() + 1).sum();
            return &text[..end.min(text.len())];
        }
    }
    text
}

/// Every `crate::NAME` a line of code (not a comment) names, with its
/// line number.
fn crate_paths(code: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (n, line) in code.lines().enumerate() {
        if line.trim_start().starts_with("//") {
            continue;
        }
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            let before = &rest[..at];
            rest = &rest[at + "crate::".len()..];
            if before.ends_with(|c: char| c.is_alphanumeric() || c == '_') {
                continue; // `foo_crate::…`
            }
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.push((n + 1, name));
            }
        }
    }
    found
}

#[test]
fn every_module_uses_only_modules_of_lower_layers() {
    // Arrange
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();

    // Act: every production `crate::` path, against the table.
    let mut wrong = Vec::new();
    let mut unlisted = Vec::new();
    for file in &files {
        let Some(module) = module_of(&src, file) else {
            continue;
        };
        let Some(own) = layer(&module) else {
            unlisted.push(module);
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap();
        for (line, used) in crate_paths(production_part(&text)) {
            if used == module {
                continue;
            }
            match layer(&used) {
                Some(theirs) if theirs < own => {}
                Some(theirs) => wrong.push(format!(
                    "{}:{line}: {module} (layer {own}) uses {used} (layer {theirs})",
                    file.strip_prefix(&src).unwrap().display()
                )),
                None => unlisted.push(used),
            }
        }
    }

    // Assert
    unlisted.sort();
    unlisted.dedup();
    assert!(
        unlisted.is_empty(),
        "modules missing from LAYERS: {unlisted:?}"
    );
    assert!(
        wrong.is_empty(),
        "imports that do not run down:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_layer_table_is_the_one_the_architecture_document_shows() {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/architecture.md"))
            .unwrap();
    for (module, layer) in LAYERS {
        let row = format!("| {layer} | ");
        let listed = doc
            .lines()
            .filter(|l| l.starts_with(&row))
            .any(|l| l.contains(&format!("`{module}`")));
        assert!(
            listed,
            "docs/architecture.md lacks `{module}` on layer {layer}"
        );
    }
}

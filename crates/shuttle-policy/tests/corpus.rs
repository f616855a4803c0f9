//! Every broken policy under `tests/corpus/*.toml` must fail with exactly the text in its
//! sibling `*.expected` file. Set `SHUTTLE_BLESS=1` to (re)write the expected files, then
//! review the diff.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::Path;

use shuttle_policy::Policy;

#[test]
fn corpus_errors_match_expected() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let bless = std::env::var_os("SHUTTLE_BLESS").is_some();
    let mut entries: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    entries.sort();
    assert!(entries.len() >= 10, "corpus is missing");
    let mut failures = Vec::new();
    for path in entries {
        let name = format!("corpus/{}", path.file_name().unwrap().to_string_lossy());
        let text = fs::read_to_string(&path).unwrap();
        let actual = match Policy::parse(&name, &text) {
            Ok(_) => "OK".to_string(),
            Err(e) => e.to_string(),
        } + "\n";
        let expected_path = path.with_extension("expected");
        if bless {
            fs::write(&expected_path, &actual).unwrap();
            continue;
        }
        let expected = fs::read_to_string(&expected_path)
            .unwrap_or_else(|_| panic!("missing {}", expected_path.display()));
        if expected != actual {
            failures.push(format!(
                "{name}:\n--- expected\n{expected}--- actual\n{actual}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

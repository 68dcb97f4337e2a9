//! Config files (`src/config.rs`, compiled here by path: it lives in the
//! `meshtun` binary crate): arbitrary text as a node file and as a backbone
//! file. Beyond "never panics": an error's line and column point into the
//! text, and every accepted key survives `Debug` (each value type checked).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

// The crate-root items config.rs refers to, as main.rs has them.
#[allow(dead_code)]
#[path = "../../src/cli_error.rs"]
mod cli_error;

#[allow(dead_code)]
#[path = "../../src/config.rs"]
mod config;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

fn check_error(text: &str, e: &config::ConfigError) {
    let shown = e.to_string();
    assert!(shown.starts_with(&e.file.display().to_string()), "error does not name the file: {shown}");
    assert!(!e.message.is_empty());
    if let Some((line, column)) = e.location {
        let lines = text.split('\n').count();
        assert!(line >= 1 && line <= lines, "line {line} outside the {lines}-line text: {shown}");
        let this = text.split('\n').nth(line - 1).unwrap_or("");
        assert!(column >= 1 && column <= this.chars().count() + 1, "column {column} outside line {line} ({this:?}): {shown}");
    }
    let _ = e.to_json();
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match config::parse::<config::NodeFile>(Path::new(config::DEFAULT_NODE_FILE), text) {
        Ok(file) => drop(format!("{file:?}")),
        Err(e) => check_error(text, &e),
    }
    match config::parse::<config::BackboneFile>(Path::new(config::DEFAULT_BACKBONE_FILE), text) {
        Ok(file) => drop(format!("{file:?}")),
        Err(e) => check_error(text, &e),
    }
    for kind in [config::Kind::Node, config::Kind::Backbone] {
        if let Err(e) = kind.check(Path::new(kind.default_file()), text) {
            check_error(text, &e);
        }
    }
});

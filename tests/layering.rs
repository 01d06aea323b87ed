//! The layering rules of the workspace, checked on the source (see `docs/ARCHITECTURE.md`, "Layers").
//!
//! - `corelay-proto` depends on no other corelay crate and on no I/O or runtime crate (mio, tokio, socket2),
//!   and forbids `unsafe`.
//! - The load generator and the fuzz targets depend on `corelay-proto`, never on the gateway; the Rust client
//!   (`corelay-client`) on no corelay crate.
//! - Inside the gateway, a module imports only modules of a lower layer (or itself):
//!   0 `auth`, `bucket`, `clock`, `cluster`, `metrics`, `timer` → 1 `config` → 2 `store` → 3 `push` →
//!   4 `backplane` → 5 `conn` → 6 `worker` → 7 `server`. The connection is a state machine without I/O: it
//!   knows its surroundings only through `conn::Env`, so it never imports the loop.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn dependencies(manifest: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(manifest).unwrap();
    let doc: toml::Table = toml::from_str(&text).unwrap();
    doc.get("dependencies")
        .and_then(|d| d.as_table())
        .map(|t| t.keys().cloned().collect())
        .unwrap_or_default()
}

#[test]
fn the_protocol_crate_stands_alone() {
    let deps = dependencies(&root().join("crates/corelay-proto/Cargo.toml"));
    for banned in ["corelay", "mio", "tokio", "socket2", "crossbeam-channel"] {
        assert!(
            !deps.iter().any(|d| d == banned),
            "corelay-proto depends on {banned}: it must stay sans-IO ({deps:?})"
        );
    }
    let lib = std::fs::read_to_string(root().join("crates/corelay-proto/src/lib.rs")).unwrap();
    assert!(lib.contains("#![forbid(unsafe_code)]"));
}

#[test]
fn the_load_generator_and_the_fuzz_targets_do_not_depend_on_the_gateway() {
    for manifest in ["crates/corelay-load/Cargo.toml", "tests/fuzz/Cargo.toml"] {
        let deps = dependencies(&root().join(manifest));
        assert!(deps.iter().any(|d| d == "corelay-proto"), "{manifest}");
        assert!(
            !deps.iter().any(|d| d == "corelay"),
            "{manifest} depends on the gateway crate"
        );
    }
}

#[test]
fn the_rust_client_depends_on_no_corelay_crate() {
    // It speaks the wire protocol as any client would: no shortcut through the gateway's or the codec's types.
    let deps = dependencies(&root().join("crates/corelay-client/Cargo.toml"));
    assert!(
        !deps.iter().any(|d| d.starts_with("corelay")),
        "corelay-client depends on {deps:?}"
    );
}

/// Layer of each top-level module of the gateway library.
fn layer(module: &str) -> Option<u8> {
    Some(match module {
        "auth" | "bucket" | "clock" | "cluster" | "metrics" | "timer" => 0,
        "config" => 1,
        "store" => 2,
        "push" => 3,
        "backplane" => 4,
        "conn" => 5,
        "worker" => 6,
        "server" => 7,
        _ => return None,
    })
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn gateway_modules_import_only_lower_layers() {
    let src = root().join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut broken: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap().to_string_lossy().to_string();
        let top = rel
            .split('/')
            .next()
            .unwrap()
            .trim_end_matches(".rs")
            .to_string();
        // The binaries (main.rs, supervise.rs) and lib.rs sit above every layer.
        let Some(own) = layer(&top) else {
            continue;
        };
        let text = std::fs::read_to_string(&f).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for (i, _) in code.match_indices("crate::") {
                let name: String = code[i + "crate::".len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if name == top {
                    continue;
                }
                match layer(&name) {
                    Some(l) if l < own => {}
                    Some(_) => broken
                        .entry(format!("{top} -> {name}"))
                        .or_default()
                        .push(format!("src/{rel}:{}", n + 1)),
                    None => panic!(
                        "src/{rel}:{}: crate::{name} is a module without a layer; add it to layer()",
                        n + 1
                    ),
                }
            }
        }
    }
    assert!(
        broken.is_empty(),
        "imports against the layers (see tests/layering.rs):\n{broken:#?}"
    );
}

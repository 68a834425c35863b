//! The house rules of the source tree, checked: no circle of imports between the files
//! of a crate (data flows one way), and crates import each other only downwards.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The module path of `file` under `src` ("a::b" for src/a/b.rs or src/a/b/mod.rs).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    match parts.as_slice() {
        [one] if one == "lib" || one == "main" => "crate".into(),
        _ => parts.join("::"),
    }
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

/// Product code of a file: without comments and without its `#[cfg(test)] mod tests`.
fn product_code(text: &str) -> String {
    let code = text
        .split("#[cfg(test)]\nmod tests")
        .next()
        .unwrap_or_default();
    code.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The paths named right after a `crate::` or `super::`: one (`a::b::C`), or each item
/// of a brace group (`{a, b::C, d::{e, f}}` names `a`, `b::C` and `d`).
fn named_paths(after: &str) -> Vec<String> {
    let is_path = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let Some(group) = after.strip_prefix('{') else {
        return vec![after.chars().take_while(|c| is_path(*c)).collect()];
    };
    let mut paths = Vec::new();
    let (mut depth, mut item) = (0usize, String::new());
    for c in group.chars() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                paths.push(std::mem::take(&mut item));
                continue;
            }
            _ => {}
        }
        if depth == 0 {
            item.push(c);
        }
    }
    paths.push(item);
    paths
        .iter()
        .map(|p| p.trim().chars().take_while(|c| is_path(*c)).collect())
        .filter(|p: &String| !p.is_empty() && p != "self")
        .collect()
}

/// Module -> the modules of the same crate it names with `crate::` or `super::`.
fn import_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: BTreeMap<String, String> = files
        .iter()
        .map(|f| {
            (
                module_of(src, f),
                product_code(&std::fs::read_to_string(f).unwrap()),
            )
        })
        .collect();
    let mut graph = BTreeMap::new();
    for (m, code) in &modules {
        let mut uses = BTreeSet::new();
        let parent = m.rsplit_once("::").map_or("", |(p, _)| p).to_string();
        for (prefix, base) in [("crate::", String::new()), ("super::", parent)] {
            for (at, _) in code.match_indices(prefix) {
                for path in named_paths(&code[at + prefix.len()..]) {
                    // The longest module prefix of the named path.
                    let segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
                    for n in (1..=segs.len()).rev() {
                        let mut t = segs[..n].join("::");
                        if !base.is_empty() {
                            t = format!("{base}::{t}");
                        }
                        if modules.contains_key(&t) {
                            if &t != m && !m.starts_with(&format!("{t}::")) {
                                uses.insert(t);
                            }
                            break;
                        }
                    }
                }
            }
        }
        graph.insert(m.clone(), uses);
    }
    graph
}

#[test]
fn brace_groups_name_each_of_their_paths() {
    assert_eq!(named_paths("loader::{a, b}; x"), ["loader::"]);
    assert_eq!(
        named_paths("{acpi, e820, multiboot::{f, g}, BootError};"),
        ["acpi", "e820", "multiboot::", "BootError"]
    );
    assert_eq!(named_paths("{self, cpu::Table}"), ["cpu::Table"]);
}

/// One cycle of `graph`, if it has any.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for m in g.get(n).into_iter().flatten() {
            match state.get(m.as_str()).copied().unwrap_or(0) {
                1 => {
                    let from = stack.iter().position(|s| s == m).unwrap_or(0);
                    let mut c = stack[from..].to_vec();
                    c.push(m.clone());
                    return Some(c);
                }
                0 => {
                    if let Some(c) = visit(m, g, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in graph.keys() {
        if state.get(n.as_str()).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(n, graph, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

fn crate_dirs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut dirs = vec![root.to_path_buf()];
    for e in std::fs::read_dir(root.join("crates")).unwrap() {
        dirs.push(e.unwrap().path());
    }
    dirs.sort();
    dirs
}

#[test]
fn no_circle_of_imports_between_the_files_of_a_crate() {
    for dir in crate_dirs() {
        let g = import_graph(&dir.join("src"));
        assert!(!g.is_empty(), "{}: no source files found", dir.display());
        if let Some(c) = find_cycle(&g) {
            panic!(
                "{}: files import each other in a circle: {}",
                dir.display(),
                c.join(" -> ")
            );
        }
    }
}

#[test]
fn the_checker_sees_a_circle() {
    let mut g = BTreeMap::new();
    g.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    g.insert("b".to_string(), BTreeSet::from(["c".to_string()]));
    g.insert("c".to_string(), BTreeSet::from(["a".to_string()]));
    assert_eq!(find_cycle(&g).map(|c| c.len()), Some(4));
    g.insert("c".to_string(), BTreeSet::new());
    assert_eq!(find_cycle(&g), None);
}

/// Crate dependencies point downwards: the pure and leaf crates never depend on the VMM,
/// the VMM never on the binary.
#[test]
fn crates_depend_only_downwards() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let deps = |c: &str| -> String {
        std::fs::read_to_string(root.join("crates").join(c).join("Cargo.toml")).unwrap()
    };
    for leaf in ["dsm", "layout", "sync", "irq", "transport", "hypervisor"] {
        let t = deps(leaf);
        for up in [
            "dvmm-vmm",
            "dvmm-dsm-uffd",
            "dvmm-cluster",
            "dvmm-devices",
            "dvmm-boot",
        ] {
            assert!(!t.contains(&format!("{up} =")), "{leaf} depends on {up}");
        }
    }
    for c in ["boot", "devices", "dsm-uffd", "cluster", "hypervisor"] {
        assert!(!deps(c).contains("dvmm-vmm ="), "{c} depends on dvmm-vmm");
    }
    // The VMM runs one node's part of a VM and knows nothing of the network: the
    // cluster runtime (`node`) sits above it.
    let vmm = deps("vmm");
    for up in [
        "dvmm-node",
        "dvmm-transport",
        "dvmm-cluster",
        "dvmm-dsm",
        "dvmm-dsm-uffd",
        "dvmm-api",
    ] {
        assert!(!vmm.contains(&format!("{up} =")), "vmm depends on {up}");
    }
    // The control API owns its wire format and its backend trait only: whoever runs a
    // VM implements the trait (node), so the API crate depends on no other dvmm crate.
    assert!(
        !deps("api").lines().any(|l| l.starts_with("dvmm-")),
        "the api crate depends on another dvmm crate"
    );
}

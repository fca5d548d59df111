//! No top-level module of the agent library imports one that imports it back: each module can
//! be read, changed and tested with only the modules below it. `crate::` references count
//! wherever they appear outside `#[cfg(test)]` code (uses, paths, macro arguments); doc
//! comments do not. `super::` stays inside a module and is not counted.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use syn::visit::Visit;

/// Top-level module name -> the other top-level modules its non-test code names.
type Graph = BTreeMap<String, BTreeSet<String>>;

fn is_test_only(attrs: &[syn::Attribute]) -> bool {
    attrs
        .iter()
        .any(|a| a.path().is_ident("cfg") && a.meta.require_list().is_ok_and(|list| list.tokens.to_string() == "test"))
}

/// The `crate::<module>` references of one file, and its non-test `mod x;` declarations.
#[derive(Default)]
struct FileRefs {
    modules: BTreeSet<String>,
    child_files: Vec<String>,
}

impl FileRefs {
    fn add_use_tree(&mut self, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                self.modules.insert(p.ident.to_string());
            }
            syn::UseTree::Name(n) => {
                self.modules.insert(n.ident.to_string());
            }
            syn::UseTree::Rename(r) => {
                self.modules.insert(r.ident.to_string());
            }
            syn::UseTree::Group(g) => g.items.iter().for_each(|t| self.add_use_tree(t)),
            syn::UseTree::Glob(_) => {}
        }
    }

    /// `crate :: name` in a macro's tokens (`format!`, `tracing::info!` arguments).
    fn add_tokens(&mut self, tokens: proc_macro2::TokenStream) {
        let tokens: Vec<proc_macro2::TokenTree> = tokens.into_iter().collect();
        for (i, token) in tokens.iter().enumerate() {
            match token {
                proc_macro2::TokenTree::Group(g) => self.add_tokens(g.stream()),
                proc_macro2::TokenTree::Ident(id) if id == "crate" => {
                    let colons = tokens.get(i + 1..i + 3).is_some_and(|t| t.iter().all(|c| c.to_string() == ":"));
                    if let (true, Some(proc_macro2::TokenTree::Ident(module))) = (colons, tokens.get(i + 3)) {
                        self.modules.insert(module.to_string());
                    }
                }
                _ => {}
            }
        }
    }
}

impl<'ast> Visit<'ast> for FileRefs {
    fn visit_item(&mut self, item: &'ast syn::Item) {
        let attrs = match item {
            syn::Item::Mod(i) => &i.attrs,
            syn::Item::Fn(i) => &i.attrs,
            syn::Item::Use(i) => &i.attrs,
            syn::Item::Impl(i) => &i.attrs,
            syn::Item::Const(i) => &i.attrs,
            syn::Item::Static(i) => &i.attrs,
            syn::Item::Struct(i) => &i.attrs,
            syn::Item::Enum(i) => &i.attrs,
            syn::Item::Trait(i) => &i.attrs,
            syn::Item::Macro(i) => &i.attrs,
            _ => return syn::visit::visit_item(self, item),
        };
        if !is_test_only(attrs) {
            syn::visit::visit_item(self, item);
        }
    }

    fn visit_item_mod(&mut self, module: &'ast syn::ItemMod) {
        if module.content.is_none() {
            self.child_files.push(module.ident.to_string());
        }
        syn::visit::visit_item_mod(self, module);
    }

    fn visit_impl_item_fn(&mut self, f: &'ast syn::ImplItemFn) {
        if !is_test_only(&f.attrs) {
            syn::visit::visit_impl_item_fn(self, f);
        }
    }

    fn visit_item_use(&mut self, item: &'ast syn::ItemUse) {
        if let syn::UseTree::Path(p) = &item.tree
            && p.ident == "crate"
        {
            self.add_use_tree(&p.tree);
        }
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        if let [first, second, ..] = path.segments.iter().collect::<Vec<_>>()[..]
            && first.ident == "crate"
        {
            self.modules.insert(second.ident.to_string());
        }
        syn::visit::visit_path(self, path);
    }

    fn visit_macro(&mut self, mac: &'ast syn::Macro) {
        self.add_tokens(mac.tokens.clone());
        syn::visit::visit_macro(self, mac);
    }
}

/// Parse `file` and the non-test module files it declares, adding what each names to `top`'s
/// entry in `graph`.
fn walk(file: &Path, top: &str, graph: &mut Graph) {
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let syntax = syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let mut refs = FileRefs::default();
    refs.visit_file(&syntax);
    graph.entry(top.to_owned()).or_default().extend(refs.modules.into_iter().filter(|m| m != top));
    // A module's children live beside `mod.rs`, or in the folder of the module's own name.
    let dir = match file.file_name().and_then(|n| n.to_str()) {
        Some("mod.rs") => file.parent().map(Path::to_path_buf),
        _ => file.parent().zip(file.file_stem()).map(|(parent, stem)| parent.join(stem)),
    };
    let dir = dir.unwrap_or_else(|| panic!("{}: no parent folder", file.display()));
    for child in refs.child_files {
        let child_file = [dir.join(format!("{child}.rs")), dir.join(&child).join("mod.rs")]
            .into_iter()
            .find(|p| p.is_file())
            .unwrap_or_else(|| panic!("{}: no file for `mod {child};`", file.display()));
        walk(&child_file, top, graph);
    }
}

/// The library's top-level modules and what each names, from `src/lib.rs` down.
fn module_graph() -> Graph {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = syn::parse_file(&std::fs::read_to_string(src.join("lib.rs")).expect("lib.rs")).expect("lib.rs parses");
    let mut graph = Graph::new();
    for item in &lib.items {
        if let syn::Item::Mod(module) = item
            && !is_test_only(&module.attrs)
        {
            let name = module.ident.to_string();
            let file = [src.join(format!("{name}.rs")), src.join(&name).join("mod.rs")]
                .into_iter()
                .find(|p| p.is_file())
                .unwrap_or_else(|| panic!("no file for `mod {name};` in lib.rs"));
            walk(&file, &name, &mut graph);
        }
    }
    graph
}

#[test]
fn no_two_top_level_modules_import_each_other() {
    let graph = module_graph();
    assert!(graph.len() > 10 && graph["collector"].contains("config"), "the walk found the modules: {graph:?}");
    let mut cycles = Vec::new();
    for (module, uses) in &graph {
        for other in uses.iter().filter(|other| module < *other) {
            if graph.get(other).is_some_and(|back| back.contains(module)) {
                cycles.push(format!("{module} <-> {other}"));
            }
        }
    }
    assert!(cycles.is_empty(), "modules that import each other: {cycles:?}");
}

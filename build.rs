//! Build script: gives the shared library its SONAME and regenerates the C header
//! `include/st_proactor.h` from the doc comments and signatures in `src/capi.rs`.

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libst_proactor.so");
    // The example servers link libst_proactor.so through its C ABI, as a C program does.
    // Cargo builds the cdylib first, into target/<profile>/deps, which is OUT_DIR's
    // great-great-grandparent's `deps` (OUT_DIR is target/<profile>/build/<crate>-<hash>/out).
    let out_dir = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    if let Some(profile_dir) = Path::new(&out_dir).ancestors().nth(3) {
        println!(
            "cargo:rustc-link-search=native={}",
            profile_dir.join("deps").display()
        );
    }

    let crate_dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let crate_dir = Path::new(&crate_dir);
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml"))
        .expect("cbindgen.toml is readable and valid");
    let bindings = cbindgen::Builder::new()
        .with_crate(crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen can read src/capi.rs");
    // Writes only when the text changed, so an unchanged header keeps its timestamp.
    bindings.write_to_file(crate_dir.join("include/st_proactor.h"));
}

//! Build script: gives the shared library its versioned SONAME, and lets the example servers
//! link it and find it next to themselves. The C header is not made here (a build script must
//! not write into the source tree): `make header` generates it, see tools/generate_header.rs.

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // libst_proactor.so.MAJOR: Cargo.toml's major version is the ABI's (README, "Install").
    let major = std::env::var("CARGO_PKG_VERSION_MAJOR").expect("cargo sets the version");
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libst_proactor.so.{major}");
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
    // Copied to the top of the build tree (`make`), ./proact_server finds the library there,
    // beside itself, without LD_LIBRARY_PATH (which still comes first when set: a RUNPATH).
    println!("cargo:rustc-link-arg-examples=-Wl,-rpath,$ORIGIN");
}

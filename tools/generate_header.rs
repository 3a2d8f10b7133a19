//! Writes the C header, include/st_proactor.h, with cbindgen: the declarations and doc
//! comments of src/capi.rs, the settings of cbindgen.toml, and the version macros taken from
//! Cargo.toml (the one place the version is written).
//!
//! Usage: `cargo run --release --example generate_header -- OUTPUT` (`make header` writes
//! include/st_proactor.h; `make check-header` writes a copy under target/ and compares it
//! with the committed header). Run from the repository: it is not part of the published crate.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The version block, right after the header's #includes.
fn version_macros() -> String {
    format!(
        "\n/*\n\
         \x20* The version of this header, MAJOR.MINOR.PATCH. getProactorVersion() returns the\n\
         \x20* version of the library a program runs with: a program may compare the two at start.\n\
         \x20*/\n\
         #define ST_PROACTOR_VERSION_MAJOR {major}\n\
         #define ST_PROACTOR_VERSION_MINOR {minor}\n\
         #define ST_PROACTOR_VERSION_PATCH {patch}\n\
         #define ST_PROACTOR_VERSION_STRING \"{version}\"",
        major = env!("CARGO_PKG_VERSION_MAJOR"),
        minor = env!("CARGO_PKG_VERSION_MINOR"),
        patch = env!("CARGO_PKG_VERSION_PATCH"),
        version = env!("CARGO_PKG_VERSION"),
    )
}

fn generate(output: &Path) -> Result<(), String> {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml"))?;
    config.after_includes = Some(version_macros());
    let bindings = cbindgen::Builder::new()
        .with_crate(crate_dir)
        .with_config(config)
        .generate()
        .map_err(|err| format!("cbindgen cannot read the crate: {err}"))?;
    let mut text = Vec::new();
    bindings.write(&mut text);
    // Writes only when the text changed, so an unchanged header keeps its timestamp.
    if std::fs::read(output).is_ok_and(|old| old == text) {
        return Ok(());
    }
    if let Some(dir) = output.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|err| format!("{}: {err}", dir.display()))?;
    }
    std::fs::write(output, text).map_err(|err| format!("{}: {err}", output.display()))
}

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(output), None) = (args.next().map(PathBuf::from), args.next()) else {
        eprintln!("usage: generate_header OUTPUT");
        return ExitCode::from(2);
    };
    match generate(&output) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("generate_header: {err}");
            ExitCode::FAILURE
        }
    }
}

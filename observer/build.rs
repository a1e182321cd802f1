//! Builds the kernel programs with aya-build and embeds the object.
//!
//! The eBPF target needs a toolchain whose `rust-src` matches its compiler exactly. Preferred:
//! rustup's nightly with `rust-src`. Fallback: Debian's `rustc-web`/`cargo-web`/`rust-web-src`
//! (installed by `cargo xtask setup`) with `RUSTC_BOOTSTRAP=1`. aya-build uses `rustup run` when
//! rustup is on PATH, so the fallback runs it with a PATH that holds only the Debian tools and a
//! link to bpf-linker.
use std::{env, path::PathBuf, process::Command};

use anyhow::{bail, Context as _};
use aya_build::{Package, Toolchain};

fn nightly_has_rust_src() -> bool {
    Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("rust-src"))
        .unwrap_or(false)
}

/// The Hubble-compatible API's protobuf files (`proto/`), compiled in Rust (protox): no protoc
/// needed.
fn compile_protos() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=proto");
    let files = [
        "flow/flow.proto",
        "relay/relay.proto",
        "observer/observer.proto",
        "observer/ext/flow_ext.proto",
        "peer/peer.proto",
        "grpc/health/v1/health.proto",
    ];
    let fds = protox::compile(files, ["proto"]).context("compiling proto/")?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)
        .context("generating the gRPC code")
}

fn main() -> anyhow::Result<()> {
    compile_protos()?;
    build_ebpf()?;
    strip_dwarf(&PathBuf::from(env::var("OUT_DIR")?).join("observer"))
}

/// Drops the kernel object's DWARF once bpf-linker has turned it into BTF: the loader reads
/// BTF only, and the DWARF (about 1.7 of its 2.1 MB) would otherwise sit in the daemon's
/// binary and memory. `llvm-strip -g` as libbpf's documentation does it; .BTF and .BTF.ext
/// stay. Without llvm-objcopy the object is embedded whole, with a warning.
fn strip_dwarf(object: &std::path::Path) -> anyhow::Result<()> {
    let objcopy = Some(PathBuf::from("/usr/lib/llvm-22/bin/llvm-objcopy"))
        .filter(|p| p.is_file())
        .or_else(|| which_in_path("llvm-objcopy"));
    let Some(objcopy) = objcopy else {
        println!("cargo:warning=llvm-objcopy not found: the eBPF object keeps its DWARF");
        return Ok(());
    };
    let st = Command::new(&objcopy)
        .arg("--strip-debug")
        .arg(object)
        .status()
        .with_context(|| format!("running {}", objcopy.display()))?;
    if !st.success() {
        bail!(
            "{} --strip-debug {}: {st}",
            objcopy.display(),
            object.display()
        );
    }
    Ok(())
}

fn build_ebpf() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=OBSERVER_EBPF_TOOLCHAIN");
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?)
        .parent()
        .context("workspace root")?
        .join("observer-ebpf");
    let package = Package {
        name: "observer-ebpf",
        root_dir: root.to_str().context("utf-8 path")?,
        ..Default::default()
    };
    let choice = env::var("OBSERVER_EBPF_TOOLCHAIN").unwrap_or_default();
    let use_nightly = match choice.as_str() {
        "nightly" => true,
        "debian" => false,
        _ => nightly_has_rust_src(),
    };
    if use_nightly {
        return aya_build::build_ebpf([package], Toolchain::Nightly);
    }

    if !PathBuf::from("/usr/lib/rustlib/src/rust/library/core").exists() {
        bail!(
            "no eBPF toolchain: rustup's nightly lacks rust-src and Debian's rust-web-src is not \
             installed; run `cargo xtask setup`"
        );
    }
    let linker = which_in_path("bpf-linker")
        .context("bpf-linker not found on PATH: run `cargo xtask setup`")?;
    let bin = PathBuf::from(env::var("OUT_DIR")?).join("ebpf-toolchain-bin");
    std::fs::create_dir_all(&bin)?;
    let link = bin.join("bpf-linker");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&linker, &link)?;
    // SAFETY (of intent): a build script is single-threaded at this point.
    env::set_var("PATH", format!("{}:/usr/bin:/bin", bin.display()));
    env::set_var("RUSTC_BOOTSTRAP", "1");
    env::remove_var("RUSTUP_TOOLCHAIN");
    aya_build::build_ebpf([package], Toolchain::Nightly)
}

fn which_in_path(name: &str) -> Option<PathBuf> {
    env::var_os("PATH").and_then(|paths| {
        env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

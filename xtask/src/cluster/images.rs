//! Container images for the test cluster, built locally from Debian packages (no registry).
//!
//! Each image is one uncompressed layer packed as a docker archive (`layer.tar`, `config.json`,
//! `manifest.json` with `RepoTags`): containerd 1.6's `ctr images import` names images from
//! `RepoTags` reliably, and needs no index or blob layout. Files come from
//! this machine: a pause program compiled here, Debian's static busybox and dnsmasq, and the
//! observer binary, each dynamically linked program with the libraries `ldd` finds for it.
//!
//! Archives live in the cache directory, named with [`FORMAT`] so a change to what this file
//! builds invalidates old ones. Pause and tools are reused whenever their archive exists; the
//! observer archive is rebuilt whenever the binary's size or mtime differs from the stamp next
//! to it (cargo rewrites the file on every relink).
use std::{
    fs::{self, File},
    io::{Read as _, Seek as _, SeekFrom, Write},
    os::unix::fs::{symlink, PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::UNIX_EPOCH,
};

use anyhow::{bail, Context as _, Result};

pub const PAUSE: &str = "registry.k8s.io/pause:3.9";
pub const TOOLS: &str = "localhost/observer-tools:1";
pub const OBSERVER: &str = "ghcr.io/observer-dev/observer:0.1.0";

/// Bumped whenever the contents or layout of an image changes, so cached archives are rebuilt.
const FORMAT: u32 = 1;

const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The pod sandbox's process: holds the namespaces open, reaps zombies (pods sharing a PID
/// namespace reparent to it), and exits at once on SIGTERM so pod deletion is quick.
const PAUSE_C: &str = r#"#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void on_term(int sig) { (void)sig; _exit(0); }

static void on_chld(int sig) {
    int saved = errno;
    (void)sig;
    while (waitpid(-1, NULL, WNOHANG) > 0) {}
    errno = saved;
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "-v") == 0) {
        puts("observer pause 3.9");
        return 0;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sigemptyset(&sa.sa_mask);
    sa.sa_handler = on_term;
    if (sigaction(SIGINT, &sa, NULL) || sigaction(SIGTERM, &sa, NULL)) return 1;
    sa.sa_handler = on_chld;
    sa.sa_flags = SA_NOCLDSTOP | SA_RESTART;
    if (sigaction(SIGCHLD, &sa, NULL)) return 2;
    for (;;) pause();
}
"#;

/// dnsmasq drops to `nobody` after binding, so the user must resolve; with no nsswitch.conf
/// glibc reads these files directly.
const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
                      nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
const GROUP: &str = "root:x:0:\nnobody:x:65534:\n";

const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

pub struct Image {
    pub name: &'static str,
    pub archive: PathBuf,
}

/// What goes in an image besides its files.
struct Spec {
    name: &'static str,
    /// Names the archive and work directory in the cache.
    short: &'static str,
    entrypoint: Option<&'static [&'static str]>,
    cmd: Option<&'static [&'static str]>,
}

const PAUSE_SPEC: Spec = Spec {
    name: PAUSE,
    short: "pause",
    entrypoint: Some(&["/pause"]),
    cmd: None,
};
const TOOLS_SPEC: Spec = Spec {
    name: TOOLS,
    short: "tools",
    entrypoint: None,
    cmd: Some(&["sh"]),
};
const OBSERVER_SPEC: Spec = Spec {
    name: OBSERVER,
    short: "observer",
    entrypoint: Some(&["/usr/local/bin/observer"]),
    cmd: None,
};

/// Builds (or reuses from `cache`, a directory it may create) the three image archives.
pub fn build_all(cache: &Path, observer_bin: &Path) -> Result<Vec<Image>> {
    fs::create_dir_all(cache).with_context(|| format!("creating {}", cache.display()))?;
    let stamp = binary_stamp(observer_bin)?;
    Ok(vec![
        cached(cache, &PAUSE_SPEC, None, pause_rootfs)?,
        cached(cache, &TOOLS_SPEC, None, tools_rootfs)?,
        cached(cache, &OBSERVER_SPEC, Some(&stamp), |root| {
            observer_rootfs(root, observer_bin)
        })?,
    ])
}

/// Identifies a build of the binary cheaply: hashing a debug build would cost more than the
/// whole cached path is allowed to take.
fn binary_stamp(bin: &Path) -> Result<String> {
    let md = fs::metadata(bin).with_context(|| format!("observer binary {}", bin.display()))?;
    let mtime = md.modified()?.duration_since(UNIX_EPOCH)?.as_nanos();
    Ok(format!(
        "{} size={} mtime_ns={mtime}\n",
        bin.display(),
        md.len()
    ))
}

/// Returns the archive for `spec`, building it with `fill` (which populates an empty root
/// directory) unless an archive of this [`FORMAT`] exists and, when given, its stamp matches.
fn cached(
    cache: &Path,
    spec: &Spec,
    stamp: Option<&str>,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<Image> {
    let archive = cache.join(format!("{}-v{FORMAT}.tar", spec.short));
    let stamp_file = cache.join(format!("{}-v{FORMAT}.stamp", spec.short));
    let fresh = archive.exists()
        && stamp.is_none_or(|s| fs::read_to_string(&stamp_file).is_ok_and(|old| old == s));
    if !fresh {
        let work = cache.join(format!("{}.work", spec.short));
        build(&work, spec, &archive, fill)
            .with_context(|| format!("building image {}", spec.name))?;
        // Written only after the archive is complete, so a failed build is never reused.
        if let Some(s) = stamp {
            fs::write(&stamp_file, s)
                .with_context(|| format!("writing {}", stamp_file.display()))?;
        }
        fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    }
    Ok(Image {
        name: spec.name,
        archive,
    })
}

fn build(
    work: &Path,
    spec: &Spec,
    archive: &Path,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    if work.exists() {
        fs::remove_dir_all(work).with_context(|| format!("removing stale {}", work.display()))?;
    }
    let root = work.join("rootfs");
    mkdirs(&root)?;
    fill(&root)?;
    normalize_dirs(&root)?;
    // Renamed into place so a reader never sees a half-written archive.
    let tmp = archive.with_extension("tar.tmp");
    write_docker_archive(&root, &tmp, spec)
        .with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, archive).with_context(|| format!("renaming into {}", archive.display()))
}

// ---------------------------------------------------------------------------------------------
// Root filesystems

fn pause_rootfs(root: &Path) -> Result<()> {
    let src = root.parent().unwrap().join("pause.c");
    fs::write(&src, PAUSE_C).with_context(|| format!("writing {}", src.display()))?;
    let bin = root.join("pause");
    run(Command::new("gcc")
        .args(["-static", "-Os", "-s", "-o"])
        .arg(&bin)
        .arg(&src))?;
    Ok(())
}

fn tools_rootfs(root: &Path) -> Result<()> {
    install(root, Path::new("/bin/busybox"), "bin/busybox")?;
    let list = run(Command::new("/bin/busybox").arg("--list"))?;
    for applet in list
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox")
    {
        let link = root.join("bin").join(applet);
        symlink("busybox", &link).with_context(|| format!("linking {}", link.display()))?;
    }
    let dnsmasq = Path::new("/usr/sbin/dnsmasq");
    install(root, dnsmasq, "usr/sbin/dnsmasq")?;
    install_libs(root, dnsmasq)?;
    write(root, "etc/passwd", PASSWD)?;
    write(root, "etc/group", GROUP)?;
    // dnsmasq writes its pid file to /var/run even in the foreground (unless told otherwise).
    mkdirs(&root.join("run"))?;
    mkdirs(&root.join("var"))?;
    symlink("../run", root.join("var/run")).context("linking var/run")?;
    mkdirs(&root.join("root"))?;
    mkdirs(&root.join("tmp"))?;
    Ok(())
}

fn observer_rootfs(root: &Path, bin: &Path) -> Result<()> {
    // A debug build is hundreds of megabytes: a hard link spares one copy of it when the
    // cache shares the target directory's filesystem (tar still stores a plain file).
    let dest = root.join("usr/local/bin/observer");
    mkdirs(dest.parent().unwrap())?;
    if fs::hard_link(bin, &dest).is_err() {
        install(root, bin, "usr/local/bin/observer")?;
    }
    install_libs(root, bin)?;
    install(root, Path::new(CA_BUNDLE), &CA_BUNDLE[1..])?;
    mkdirs(&root.join("tmp"))?;
    Ok(())
}

/// Copies every library `ldd` resolves for `bin` into the image, each at the path the dynamic
/// loader will look for (symlinks on the host become plain files).
fn install_libs(root: &Path, bin: &Path) -> Result<()> {
    for lib in shared_libs(bin)? {
        let rel = lib.strip_prefix("/").unwrap_or(&lib);
        if !root.join(rel).exists() {
            install(root, &lib, rel)?;
        }
    }
    Ok(())
}

/// The libraries and loader `ldd` lists for `bin`; none for a static binary.
fn shared_libs(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .with_context(|| format!("running ldd {}", bin.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // glibc's ldd fails with this message for static (and static-pie) executables.
        if String::from_utf8_lossy(&out.stderr).contains("not a dynamic executable") {
            return Ok(vec![]);
        }
        bail!("ldd {} failed ({}): {text}", bin.display(), out.status);
    }
    let mut libs = vec![];
    for line in text.lines() {
        if line.contains("not found") {
            bail!("ldd {}: missing library: {}", bin.display(), line.trim());
        }
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" for a library,
        // "/lib64/ld-linux-x86-64.so.2 (0x...)" for the loader; linux-vdso has no path (the
        // kernel maps it).
        let path = line
            .split_once("=>")
            .map_or(line, |(_, p)| p)
            .split_whitespace()
            .next()
            .unwrap_or("");
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// Copies `src` (following symlinks) to `rel` under `root`, keeping its permission bits.
fn install(root: &Path, src: &Path, rel: impl AsRef<Path>) -> Result<()> {
    let dest = root.join(rel);
    mkdirs(dest.parent().unwrap())?;
    fs::copy(src, &dest)
        .with_context(|| format!("copying {} to {}", src.display(), dest.display()))?;
    Ok(())
}

fn write(root: &Path, rel: &str, text: &str) -> Result<()> {
    let dest = root.join(rel);
    mkdirs(dest.parent().unwrap())?;
    fs::write(&dest, text).with_context(|| format!("writing {}", dest.display()))?;
    fs::set_permissions(&dest, fs::Permissions::from_mode(0o644))
        .with_context(|| format!("chmod {}", dest.display()))
}

fn mkdirs(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

/// Sets every directory to 0755 (whatever the umask made it) and /tmp to 1777, so layers do
/// not depend on who built them.
fn normalize_dirs(root: &Path) -> Result<()> {
    fn walk(dir: &Path) -> Result<()> {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("chmod {}", dir.display()))?;
        for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let e = e?;
            if e.file_type()?.is_dir() {
                walk(&e.path())?;
            }
        }
        Ok(())
    }
    walk(root)?;
    let tmp = root.join("tmp");
    if tmp.is_dir() {
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o1777))
            .with_context(|| format!("chmod {}", tmp.display()))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Docker archive

/// Writes a docker archive of a single-layer image of `root` to `dest`: `layer.tar`, then
/// `config.json` and `manifest.json` (containerd reads the whole archive before resolving what
/// the manifest names, so the order is free). The archive is assembled here rather than by a
/// second `tar` so that the layer, hundreds of megabytes with a debug observer, is written
/// once, and hashed as it is written.
fn write_docker_archive(root: &Path, dest: &Path, spec: &Spec) -> Result<()> {
    let mut out = File::create(dest)?;
    // The layer's header, rewritten once its size is known.
    out.write_all(&[0; 512])?;
    let (size, digest) = stream_layer(root, &mut out)?;
    pad(&mut out, size)?;
    out.seek(SeekFrom::Start(0))?;
    out.write_all(&tar_header("layer.tar", size)?)?;
    out.seek(SeekFrom::End(0))?;
    let config = serde_json::to_vec(&image_config(spec, &digest))?;
    let manifest = serde_json::to_vec(&serde_json::json!([{
        "Config": "config.json",
        "RepoTags": [spec.name],
        "Layers": ["layer.tar"],
    }]))?;
    for (name, data) in [("config.json", config), ("manifest.json", manifest)] {
        out.write_all(&tar_header(name, data.len() as u64)?)?;
        out.write_all(&data)?;
        pad(&mut out, data.len() as u64)?;
    }
    // End of archive: two zero blocks.
    out.write_all(&[0; 1024])?;
    Ok(())
}

fn image_config(spec: &Spec, layer_digest: &str) -> serde_json::Value {
    let mut process = serde_json::json!({ "Env": [PATH_ENV], "WorkingDir": "/" });
    if let Some(e) = spec.entrypoint {
        process["Entrypoint"] = e.into();
    }
    if let Some(c) = spec.cmd {
        process["Cmd"] = c.into();
    }
    serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        // Fixed so the config digest, and so the image ID, depend only on the contents.
        "created": "1970-01-01T00:00:00Z",
        "config": process,
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{layer_digest}")] },
        "history": [{ "created": "1970-01-01T00:00:00Z", "created_by": "cargo xtask (images.rs)" }],
    })
}

/// Packs `root` with `tar` into `out` and through `sha256sum` at once; returns the layer's size
/// and digest. Sorted, owned by root and with a fixed mtime, so the same files give the same
/// digest.
fn stream_layer(root: &Path, out: &mut impl Write) -> Result<(u64, String)> {
    let mut tar = Command::new("tar")
        .args([
            "--sort=name",
            "--mtime=@0",
            "--numeric-owner",
            "--owner=0",
            "--group=0",
            "--format=gnu",
            "-C",
        ])
        .arg(root)
        .args(["-cf", "-", "."])
        .stdout(Stdio::piped())
        .spawn()
        .context("running tar")?;
    let mut hasher = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("running sha256sum")?;
    let mut src = tar.stdout.take().unwrap();
    let mut sink = hasher.stdin.take().unwrap();
    let mut buf = vec![0; 1 << 20];
    let mut size = 0;
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("reading tar's output"),
        };
        out.write_all(&buf[..n])?;
        sink.write_all(&buf[..n]).context("feeding sha256sum")?;
        size += n as u64;
    }
    drop(sink);
    let status = tar.wait().context("waiting for tar")?;
    if !status.success() {
        bail!("tar -C {} failed ({status})", root.display());
    }
    let hashed = hasher.wait_with_output().context("waiting for sha256sum")?;
    let text = String::from_utf8_lossy(&hashed.stdout);
    match text.split_whitespace().next() {
        Some(h) if hashed.status.success() && h.len() == 64 => Ok((size, h.to_string())),
        _ => bail!("sha256sum failed ({}): {text:?}", hashed.status),
    }
}

/// A ustar header for a regular file `name` of `size` bytes, owned by root, mode 0644, mtime 0.
fn tar_header(name: &str, size: u64) -> Result<[u8; 512]> {
    if name.len() >= 100 || size >= 1 << 33 {
        bail!("{name} ({size} bytes) does not fit a plain ustar header");
    }
    let mut h = [0; 512];
    let mut put = |at: usize, val: &[u8]| h[at..at + val.len()].copy_from_slice(val);
    put(0, name.as_bytes());
    put(100, b"0000644\0");
    put(108, b"0000000\0");
    put(116, b"0000000\0");
    put(124, format!("{size:011o}\0").as_bytes());
    put(136, b"00000000000\0");
    put(156, b"0");
    put(257, b"ustar\0");
    put(263, b"00");
    // The checksum sums the header with its own field taken as spaces.
    put(148, b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    Ok(h)
}

/// Zeros up to the next 512-byte block after `size` bytes of a member.
fn pad(out: &mut impl Write, size: u64) -> Result<()> {
    let rest = (512 - size % 512) % 512;
    out.write_all(&vec![0; rest as usize])?;
    Ok(())
}

/// Runs `cmd`, failing with its stderr when it exits non-zero; returns its stdout.
fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: Spec = Spec {
        name: "localhost/unit-test:1",
        short: "unit",
        entrypoint: Some(&["/hello"]),
        cmd: None,
    };

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("images-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn sha256(file: &Path) -> String {
        let out = run(Command::new("sha256sum").arg(file)).unwrap();
        out.split_whitespace().next().unwrap().to_string()
    }

    fn read_json(archive: &Path, member: &str) -> serde_json::Value {
        let out = run(Command::new("tar").arg("-xOf").arg(archive).arg(member)).unwrap();
        serde_json::from_str(&out).unwrap()
    }

    #[test]
    fn docker_archive_names_the_image_and_its_layer() {
        let cache = scratch("archive");
        fs::create_dir_all(&cache).unwrap();
        let img = cached(&cache, &SPEC, None, |root| write(root, "hello", "hi")).unwrap();
        assert_eq!(img.name, SPEC.name);
        let manifest = read_json(&img.archive, "manifest.json");
        assert_eq!(manifest[0]["RepoTags"][0], SPEC.name);
        let config = read_json(&img.archive, "config.json");
        assert_eq!(config["architecture"], "amd64");
        assert_eq!(config["config"]["Entrypoint"][0], "/hello");
        assert!(config["config"].get("Cmd").is_none());
        // The diff ID is the digest of the uncompressed layer as stored.
        let work = cache.join("x");
        fs::create_dir_all(&work).unwrap();
        run(Command::new("tar")
            .arg("-C")
            .arg(&work)
            .arg("-xf")
            .arg(&img.archive))
        .unwrap();
        let digest = sha256(&work.join("layer.tar"));
        assert_eq!(config["rootfs"]["diff_ids"][0], format!("sha256:{digest}"));
        fs::remove_dir_all(&cache).unwrap();
    }

    #[test]
    fn archives_are_reused_until_the_stamp_changes() {
        let cache = scratch("reuse");
        fs::create_dir_all(&cache).unwrap();
        let fill = |root: &Path| write(root, "hello", "hi");
        let first = cached(&cache, &SPEC, Some("a"), fill).unwrap();
        let sum = sha256(&first.archive);
        cached(&cache, &SPEC, Some("a"), |_| {
            bail!("rebuilt a fresh archive")
        })
        .unwrap();
        assert!(cached(&cache, &SPEC, Some("b"), |_| bail!("rebuilt")).is_err());
        // Same files, same bytes: the layer and config are reproducible.
        let again = cached(&cache, &SPEC, Some("c"), fill).unwrap();
        assert_eq!(sha256(&again.archive), sum);
        fs::remove_dir_all(&cache).unwrap();
    }

    #[test]
    fn ldd_lists_libc_and_the_loader() {
        let libs = shared_libs(&std::env::current_exe().unwrap()).unwrap();
        assert!(libs.iter().any(|l| l.ends_with("libc.so.6")), "{libs:?}");
        assert!(
            libs.iter()
                .any(|l| l.to_string_lossy().contains("ld-linux")),
            "{libs:?}"
        );
        assert!(shared_libs(Path::new("/bin/busybox")).map_or(true, |l| l.is_empty()));
    }
}

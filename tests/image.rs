//! The container image (`deploy/Containerfile`), built by podman and checked without running
//! a container (no registry and no container runtime can be used here): the `prebuilt` target
//! is built offline from the filesystem `deploy/image/rootfs.sh` assembles around this build's
//! kvgate binary, exported, and `kvgate --version` and `kvgate inspect` run from it under
//! `chroot` as UID 65532, with no host environment and only the image's files — plus the
//! deployed config and the tokenizer copied to where deploy/ mounts them.
//!
//! The binary is the one `cargo test` builds (debug): it links the same libraries and loader
//! as the release build, and rootfs.sh strips its debug info like a release binary's.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{SystemTime, UNIX_EPOCH};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn run(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (bash .ci/setup installs it): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The image and container this test made; removed whatever happens, by their own names.
struct Built {
    image: String,
    container: Option<String>,
}

impl Drop for Built {
    fn drop(&mut self) {
        if let Some(container) = &self.container {
            let _ = Command::new("podman")
                .args(["rm", "-f", container])
                .output();
        }
        let _ = Command::new("podman")
            .args(["rmi", "-f", &self.image])
            .output();
    }
}

/// `kvgate ARGS` inside the exported image, as the image's user, with an empty environment.
fn in_image(rootfs: &Path, args: &[&str]) -> Output {
    let user = "65532:65532";
    let out = Command::new("/usr/sbin/chroot")
        .env_clear()
        .arg(format!("--userspec={user}"))
        .arg(rootfs)
        .arg("/usr/local/bin/kvgate")
        .args(args)
        .output()
        .expect("run chroot");
    assert!(
        out.status.success(),
        "kvgate {args:?} in the image failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn copy_into(rootfs: &Path, from: impl AsRef<Path>, to: &str) {
    let to = rootfs.join(to.trim_start_matches('/'));
    fs::create_dir_all(to.parent().expect("a parent")).expect("mkdir");
    fs::copy(from.as_ref(), &to).unwrap_or_else(|e| panic!("copy to {}: {e}", to.display()));
}

#[test]
fn the_image_runs_kvgate_as_non_root_from_its_own_files() {
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let context = work.path().join("context");
    run(
        &format!("{ROOT}/deploy/image/rootfs.sh"),
        &[
            env!("CARGO_BIN_EXE_kvgate"),
            context.to_str().expect("utf-8 path"),
        ],
    );

    // A name of its own: other builds may share this machine's podman storage.
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    let mut built = Built {
        image: format!("localhost/kvgate-test:{}-{nanos}", std::process::id()),
        container: None,
    };
    run(
        "podman",
        &[
            "build",
            "--quiet",
            "--layers=false",
            "--file",
            &format!("{ROOT}/deploy/Containerfile"),
            "--target",
            "prebuilt",
            "--tag",
            &built.image,
            context.to_str().expect("utf-8 path"),
        ],
    );
    let config = text(&run(
        "podman",
        &[
            "image",
            "inspect",
            "--format",
            "{{.Config.User}} {{json .Config.Entrypoint}} {{json .Config.Cmd}}",
            &built.image,
        ],
    ));
    assert_eq!(
        config,
        r#"65532:65532 ["/usr/local/bin/kvgate"] ["serve","--config","/etc/kvgate/kvgate.yaml"]"#
    );

    let container = text(&run("podman", &["create", &built.image]));
    built.container = Some(container.clone());
    let tar = work.path().join("image.tar");
    run(
        "podman",
        &[
            "export",
            "--output",
            tar.to_str().expect("utf-8 path"),
            &container,
        ],
    );
    let rootfs: PathBuf = work.path().join("rootfs");
    fs::create_dir(&rootfs).expect("mkdir rootfs");
    run(
        "tar",
        &[
            "-x",
            "-f",
            tar.to_str().expect("utf-8 path"),
            "-C",
            rootfs.to_str().expect("utf-8 path"),
        ],
    );
    drop(built);

    // Nothing but kvgate can run in it, and the tokenizer is not baked in.
    for absent in ["bin/sh", "usr/bin", "models"] {
        assert!(!rootfs.join(absent).exists(), "the image holds /{absent}");
    }

    let version = String::from_utf8(in_image(&rootfs, &["--version"]).stdout).expect("utf-8");
    let head = text(&run("git", &["-C", ROOT, "rev-parse", "HEAD"]));
    assert_eq!(
        version.trim(),
        format!("kvgate {} (commit {head})", env!("CARGO_PKG_VERSION"))
    );

    // What deploy/kvgate/deployment.yaml mounts: the ConfigMap and the model volume.
    copy_into(
        &rootfs,
        format!("{ROOT}/deploy/kvgate/kvgate.yaml"),
        "/etc/kvgate/kvgate.yaml",
    );
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        copy_into(
            &rootfs,
            format!("{ROOT}/.tokenizers/qwen3/{file}"),
            &format!("/models/{file}"),
        );
    }
    copy_into(
        &rootfs,
        format!("{ROOT}/conf/examples/round1.json"),
        "/tmp/round1.json",
    );
    let inside: serde_json::Value = serde_json::from_slice(
        &in_image(
            &rootfs,
            &[
                "inspect",
                "--config",
                "/etc/kvgate/kvgate.yaml",
                "/tmp/round1.json",
            ],
        )
        .stdout,
    )
    .expect("inspect prints JSON");

    // The same request, tokenized on the host with the repository's config and tokenizer.
    let host = Command::new(env!("CARGO_BIN_EXE_kvgate"))
        .current_dir(ROOT)
        .args(["inspect", "conf/examples/round1.json"])
        .output()
        .expect("run kvgate inspect on the host");
    let host: serde_json::Value = serde_json::from_slice(&host.stdout).expect("host inspect JSON");
    let tokens = inside["tokenIds"].as_array().expect("token ids");
    assert!(tokens.len() > 64, "{inside}");
    assert_eq!(inside["tokenIds"], host["tokenIds"]);
    assert_eq!(inside["renderedPrompt"], host["renderedPrompt"]);
    let blocks = inside["blocks"].as_array().expect("blocks");
    assert_eq!(
        blocks.len(),
        tokens.len() / 64,
        "deploy/'s block size is 64"
    );
}

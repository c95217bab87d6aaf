//! Stamps the git commit into the binary (`kvgate --version`, the startup log line).
//!
//! `KVGATE_GIT_COMMIT` wins when set (container builds and tarballs have no `.git`);
//! otherwise `git rev-parse HEAD`; otherwise "unknown". Nothing here fails the build.

use std::path::PathBuf;
use std::process::Command;

const ENV: &str = "KVGATE_GIT_COMMIT";

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    (out.status.success() && !text.trim().is_empty()).then(|| text.trim().to_string())
}

fn main() {
    println!("cargo:rerun-if-env-changed={ENV}");
    println!("cargo:rerun-if-changed=build.rs");
    let commit = match std::env::var(ENV) {
        Ok(commit) if !commit.trim().is_empty() => commit.trim().to_string(),
        _ => {
            // Rebuild when HEAD moves: a checkout changes HEAD, a commit changes the branch's
            // ref (a loose file, or packed-refs once git packs it).
            if let Some(head) = git(&["rev-parse", "--git-path", "HEAD"]) {
                let mut watched = vec![PathBuf::from(head)];
                if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
                    watched.extend(git(&["rev-parse", "--git-path", &branch]).map(PathBuf::from));
                }
                watched.extend(git(&["rev-parse", "--git-path", "packed-refs"]).map(PathBuf::from));
                for path in watched.iter().filter(|p| p.exists()) {
                    println!("cargo:rerun-if-changed={}", path.display());
                }
            }
            git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into())
        }
    };
    println!("cargo:rustc-env=KVGATE_COMMIT={commit}");
}

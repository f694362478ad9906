//! Fetches GraphiQL's browser bundle (and the React it runs on) from the npm registry, so that
//! rechat serves GraphiQL itself and it works without internet access at run time.
//!
//! Each package is pinned by version and by the registry's sha512 integrity, checked here;
//! `npm pack` keeps them in npm's cache, so later builds need no network. Without npm (or
//! without the registry on a first build) the build goes on with a warning and GraphiQL loads
//! its scripts from a CDN instead.

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine as _;
use sha2::{Digest, Sha512};

/// (file in the package, name it is served under)
type File = (&'static str, &'static str);

/// (package@version, sha512 integrity, its files)
const PACKAGES: &[(&str, &str, &[File])] = &[
    (
        "graphiql@4.0.3",
        "/kSuorVA1qzP796/gckJzpsRveoIsm/1UJI5a8QnI1NLlXvI3ILxSHOB6P7T6rooV+CRU8HfcWItPmqyxPjC3g==",
        &[
            ("package/graphiql.min.js", "graphiql.min.js"),
            ("package/graphiql.min.css", "graphiql.min.css"),
        ],
    ),
    (
        "react@18.3.1",
        "wS+hAgJShR0KhEvPJArfuPVN1+Hz1t0Y6n5jLrGQbkb4urgPE/0Rve+1kMB1v/oWgHgm4WIcV+i7F2pTVj+2iQ==",
        &[(
            "package/umd/react.production.min.js",
            "react.production.min.js",
        )],
    ),
    (
        "react-dom@18.3.1",
        "5m4nQKp+rZRb09LNH59GM4BxTh9251/ylbKIbpe7TpGxfJ+9kv6BLkLBXIjjspbgbnIBNqlI23tRnTWT0snUIw==",
        &[(
            "package/umd/react-dom.production.min.js",
            "react-dom.production.min.js",
        )],
    ),
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-check-cfg=cfg(graphiql_bundled)");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let assets = out.join("graphiql");
    match fetch_all(&assets) {
        Ok(()) => println!("cargo:rustc-cfg=graphiql_bundled"),
        Err(why) => println!(
            "cargo:warning=GraphiQL is not bundled ({why}); the page will load it from a CDN"
        ),
    }
}

fn fetch_all(assets: &Path) -> Result<(), String> {
    std::fs::create_dir_all(assets).map_err(|e| e.to_string())?;
    for (package, integrity, files) in PACKAGES {
        if files.iter().all(|(_, name)| assets.join(name).exists()) {
            continue;
        }
        let tarball = pack(package, assets)?;
        let bytes = std::fs::read(&tarball).map_err(|e| e.to_string())?;
        let digest = base64::engine::general_purpose::STANDARD.encode(Sha512::digest(&bytes));
        if digest != *integrity {
            return Err(format!("{package} does not match its pinned sha512"));
        }
        for (inner, name) in *files {
            let output = Command::new("tar")
                .arg("-xzOf")
                .arg(&tarball)
                .arg(inner)
                .output()
                .map_err(|e| format!("running tar: {e}"))?;
            if !output.status.success() || output.stdout.is_empty() {
                return Err(format!("{inner} is missing from {package}"));
            }
            std::fs::write(assets.join(name), output.stdout).map_err(|e| e.to_string())?;
        }
        let _ = std::fs::remove_file(&tarball);
    }
    Ok(())
}

/// Downloads (or takes from npm's cache) a package's tarball into `dir`.
fn pack(package: &str, dir: &Path) -> Result<PathBuf, String> {
    let output = Command::new("npm")
        .args([
            "pack",
            package,
            "--silent",
            "--prefer-offline",
            "--pack-destination",
        ])
        .arg(dir)
        .output()
        .map_err(|e| format!("running npm: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "npm pack {package} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let name = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let name = name.lines().last().unwrap_or_default();
    Ok(dir.join(name))
}

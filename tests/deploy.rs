//! The deployment files in deploy/: the container image (deploy/build-image.sh builds it from
//! the tested binary; it is pushed into a running berth, pulled back with skopeo, inspected and
//! run with podman), the compose file and the Kubernetes overlays (rendered, validated against
//! the Kubernetes schemas, their berth configs checked by `berth check-config`).
//!
//! Tools: buildah, skopeo, podman, docker-compose, kubectl (Debian) and kubernetes-validate
//! (PyPI: the Kubernetes JSON schemas, offline). CI installs them; BERTH_SKIP_CLIENT_TESTS=1
//! skips the tests whose tools are missing, saying so.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;

const BERTH: &str = env!("CARGO_BIN_EXE_berth");

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs a command and fails the test with its output if it fails.
#[track_caller]
fn run(cmd: &mut Command) -> Output {
    let shown = format!("{cmd:?}");
    let out = cmd.output().unwrap_or_else(|e| panic!("{shown}: {e}"));
    assert!(
        out.status.success(),
        "{shown} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// `cmd` in a private mount namespace with an empty blob-info cache: podman, buildah and
/// skopeo share /var/lib/containers/cache, through which a push can silently turn into a
/// cross-repository mount of what another test uploaded.
fn isolated(cmd: &str) -> Command {
    let mut c = Command::new("unshare");
    c.args([
        "-m",
        "sh",
        "-c",
        "mkdir -p /var/lib/containers/cache && mount -t tmpfs tmpfs /var/lib/containers/cache && exec \"$@\"",
        "isolated",
        cmd,
    ]);
    c
}

// ---------------------------------------------------------------------------------------------
// the image

/// The image's single layer: path -> (mode, uid, size), from `tar -tv`.
fn layer_entries(layer: &Path) -> BTreeMap<String, (String, String)> {
    let out = run(Command::new("tar")
        .arg("--numeric-owner")
        .arg("-tvf")
        .arg(layer));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // mode owner size date time path [-> target]
            let path = f.get(5)?.trim_start_matches("./").trim_end_matches('/');
            Some((path.to_string(), (f[0].to_string(), f[1].to_string())))
        })
        .collect()
}

#[test]
fn image_builds_pushes_pulls_and_runs() {
    for (tool, package) in [
        ("buildah", "buildah"),
        ("skopeo", "skopeo"),
        ("podman", "podman"),
    ] {
        if !have_tool(tool, package) {
            return;
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let built = tmp.path().join("built");
    run(isolated("bash")
        .arg(repo_root().join("deploy/build-image.sh"))
        .arg(&built)
        .arg("test")
        .env("BERTH_BIN", BERTH));

    let berth = Berth::start("");
    let reference = format!("127.0.0.1:{}/deploy/berth:test", berth.port);
    run(isolated("skopeo").args([
        "--insecure-policy",
        "copy",
        "--preserve-digests",
        "--dest-tls-verify=false",
        &format!("oci:{}:test", built.display()),
        &format!("docker://{reference}"),
    ]));

    // The image's config as berth serves it.
    let config = json(&run(isolated("skopeo").args([
        "inspect",
        "--config",
        "--tls-verify=false",
        &format!("docker://{reference}"),
    ])));
    let c = &config["config"];
    assert_eq!(
        c["Entrypoint"],
        serde_json::json!(["/usr/local/bin/berth", "serve"]),
        "{config}"
    );
    assert_eq!(
        c["Cmd"],
        serde_json::json!(["--config", "/etc/berth/berth.yaml"]),
        "{config}"
    );
    assert_eq!(c["User"], "65532:65532", "{config}");
    let ports: BTreeSet<&str> = c["ExposedPorts"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(ports, BTreeSet::from(["5000/tcp", "9090/tcp"]), "{config}");
    assert!(c["Volumes"].get("/var/lib/berth").is_some(), "{config}");
    let labels = &c["Labels"];
    assert_eq!(
        labels["org.opencontainers.image.title"], "berth",
        "{config}"
    );
    assert_eq!(
        labels["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION"),
        "{config}"
    );
    assert_eq!(
        labels["org.opencontainers.image.licenses"], "Apache-2.0",
        "{config}"
    );
    assert!(
        labels["org.opencontainers.image.revision"].is_string(),
        "{config}"
    );

    // Pulled back: the same manifest, and a layer holding exactly what the image needs.
    let pulled = tmp.path().join("pulled");
    run(isolated("skopeo").args([
        "--insecure-policy",
        "copy",
        "--src-tls-verify=false",
        "--dest-oci-accept-uncompressed-layers",
        &format!("docker://{reference}"),
        &format!("oci:{}:test", pulled.display()),
    ]));
    let index = |dir: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap()
    };
    let digest = index(&built)["manifests"][0]["digest"].clone();
    assert_eq!(
        index(&pulled)["manifests"][0]["digest"],
        digest,
        "manifest changed on the way"
    );
    let blob = |dir: &Path, d: &str| {
        dir.join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob(&pulled, digest.as_str().unwrap())).unwrap())
            .unwrap();
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "{manifest}");
    let layer_digest = layers[0]["digest"].as_str().unwrap();
    let layer = blob(&pulled, layer_digest);
    assert!(
        std::fs::read(&layer).unwrap() == std::fs::read(blob(&built, layer_digest)).unwrap(),
        "layer {layer_digest} pulled from berth differs from the one pushed"
    );
    assert_eq!(sha256_digest(&std::fs::read(&layer).unwrap()), layer_digest);
    let entries = layer_entries(&layer);
    let ldd = run(Command::new("ldd").arg(BERTH));
    let mut wanted: Vec<String> = vec![
        "usr/local/bin/berth".into(),
        "etc/passwd".into(),
        "etc/group".into(),
        "etc/ssl/certs/ca-certificates.crt".into(),
        "etc/berth/berth.yaml".into(),
    ];
    for line in String::from_utf8(ldd.stdout).unwrap().lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux... (0x...)"
        let path = match line.split_once("=> ") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            wanted.push(p.trim_start_matches('/').to_string());
        }
    }
    for w in &wanted {
        assert!(
            entries.contains_key(w),
            "{w} is not in the image layer: {entries:?}"
        );
    }
    assert_eq!(
        entries["var/lib/berth"].1, "65532/65532",
        "data volume owner: {entries:?}"
    );
    assert!(
        entries["usr/local/bin/berth"].0.contains('x'),
        "{entries:?}"
    );
    let passwd = run(Command::new("tar")
        .arg("-xOf")
        .arg(&layer)
        .arg("etc/passwd"));
    assert!(
        String::from_utf8_lossy(&passwd.stdout).contains("berth:x:65532:65532:"),
        "/etc/passwd names no berth user"
    );
    let binary = run(Command::new("tar")
        .arg("-xOf")
        .arg(&layer)
        .arg("usr/local/bin/berth"));
    assert!(
        binary.stdout == std::fs::read(BERTH).unwrap(),
        "the image's berth is not the tested binary"
    );

    // Run it: the image pulled from berth answers GET /v2/ as a registry of its own.
    match run_container(&tmp.path().join("podman"), &reference) {
        Ok(how) => eprintln!("podman run: the image answered GET /v2/ ({how})"),
        Err(why) => eprintln!(
            "NOTE: the image was not run: this machine does not let podman run containers \
             ({why}). Its config and layer were verified above."
        ),
    }
}

/// Runs the image with podman (host network, berth on a free loopback port) and waits for it
/// to answer GET /v2/. Sandboxes differ in what they allow (cgroup v1 without systemd,
/// rlimits that cannot be raised), so a few runtime settings are tried in turn; the error
/// says why none worked.
fn run_container(storage: &Path, reference: &str) -> Result<String, String> {
    let podman = |extra: &[&str]| {
        let mut c = isolated("podman");
        c.arg("--root")
            .arg(storage.join("root"))
            .arg("--runroot")
            .arg(storage.join("run"))
            .args([
                "--storage-driver=vfs",
                "--events-backend=none",
                "--cgroup-manager=cgroupfs",
            ])
            .args(extra);
        c
    };
    let pull = podman(&["pull", "--tls-verify=false", reference])
        .output()
        .map_err(|e| e.to_string())?;
    if !pull.status.success() {
        return Err(format!(
            "podman pull: {}",
            String::from_utf8_lossy(&pull.stderr).trim()
        ));
    }
    // (what, podman's global flags, `podman run` flags)
    let attempts: [(&str, &[&str], &[&str]); 2] = [
        ("default runtime", &[], &[]),
        (
            "runc, rlimits lowered",
            &["--runtime", "runc"],
            &[
                "--ulimit",
                "nofile=1024:1024",
                "--ulimit",
                "nproc=1024:1024",
            ],
        ),
    ];
    let mut why = Vec::new();
    for (name, global, flags) in attempts {
        let port = free_port();
        let container = format!("berth-deploy-test-{port}");
        let listen = format!("127.0.0.1:{port}");
        let out = podman(global)
            .args(["run", "-d", "--rm", "--network=host", "--name", &container])
            .args(flags)
            .args([
                reference,
                "--config",
                "/etc/berth/berth.yaml",
                "--listen",
                &listen,
            ])
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            why.push(format!(
                "{name}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
            continue;
        }
        let answered = wait_for_v2(port, Duration::from_secs(30));
        let logs = podman(global).args(["logs", &container]).output();
        let _ = podman(global).args(["rm", "-f", &container]).output();
        match answered {
            Ok(()) => return Ok(name.to_string()),
            Err(e) => why.push(format!(
                "{name}: started but {e}; its log: {}",
                logs.map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                    .unwrap_or_default()
            )),
        }
    }
    Err(why.join("; "))
}

fn wait_for_v2(port: u16, timeout: Duration) -> Result<(), String> {
    let c = client();
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no answer");
    while Instant::now() < deadline {
        match c
            .get(format!("http://127.0.0.1:{port}/v2/"))
            .timeout(Duration::from_secs(2))
            .send()
        {
            Ok(r) if r.status() == 200 => return Ok(()),
            Ok(r) => last = format!("GET /v2/ answered {}", r.status()),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(last)
}

// ---------------------------------------------------------------------------------------------
// berth configs shipped in deploy/

/// `berth check-config` on `config` with `env`. A config with a `metadata:` section (the
/// PostgreSQL backend) is checked whole when this berth knows the section; a berth without it
/// (the backend not merged yet) must reject exactly that key, and the rest of the file is
/// checked without it.
fn check_config(config: &Path, env: &[(String, String)]) {
    let check = |path: &Path| {
        Command::new(BERTH)
            .arg("check-config")
            .arg("--config")
            .arg(path)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap()
    };
    let out = check(config);
    if out.status.success() {
        return;
    }
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let text = std::fs::read_to_string(config).unwrap();
    let mut doc: serde_yaml::Mapping = serde_yaml::from_str(&text).unwrap();
    assert!(
        doc.contains_key("metadata") && err.contains("metadata"),
        "berth check-config rejects {}: {err}",
        config.display()
    );
    eprintln!(
        "NOTE: this berth has no `metadata:` section yet ({}); {} checked without it",
        err.trim(),
        config.display()
    );
    doc.remove("metadata");
    let stripped = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(stripped.path(), serde_yaml::to_string(&doc).unwrap()).unwrap();
    let out = check(stripped.path());
    assert!(
        out.status.success(),
        "berth check-config rejects {} (without metadata:): {}",
        config.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------------
// compose

#[test]
fn compose_file_parses_and_its_berth_configs_pass_check_config() {
    if !have_tool("docker-compose", "docker-compose") {
        return;
    }
    let file = repo_root().join("deploy/compose.yaml");
    let render = |profile: Option<&str>| -> serde_yaml::Value {
        let mut c = Command::new("docker-compose");
        c.arg("-f").arg(&file);
        if let Some(p) = profile {
            c.args(["--profile", p]);
        }
        let out = run(c.arg("config"));
        serde_yaml::from_slice(&out.stdout).unwrap()
    };
    // docker-compose 1.29 prints every service whatever the profile: the cluster's are
    // recognised by their `profiles`.
    let rendered = render(Some("cluster"));
    let services = rendered["services"].as_mapping().unwrap();
    let in_profile = |profile: Option<&str>| -> BTreeSet<String> {
        services
            .iter()
            .filter(|(_, s)| {
                let p = s["profiles"].as_sequence();
                match profile {
                    None => p.is_none(),
                    Some(want) => p.is_some_and(|p| p.iter().any(|x| x.as_str() == Some(want))),
                }
            })
            .map(|(k, _)| k.as_str().unwrap().to_string())
            .collect()
    };
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(
        in_profile(None),
        strings(&["minio", "bucket", "berth", "prometheus"])
    );
    assert_eq!(
        in_profile(Some("cluster")),
        strings(&["postgres", "berth-1", "berth-2", "lb"])
    );
    let cluster = &rendered;

    // Every berth config a service mounts passes check-config, with that service's environment.
    let mut checked = 0;
    for (name, service) in cluster["services"].as_mapping().unwrap() {
        let env: Vec<(String, String)> = service["environment"]
            .as_mapping()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.as_str().unwrap().into(), v.as_str().unwrap_or("").into()))
                    .collect()
            })
            .unwrap_or_default();
        for volume in service["volumes"].as_sequence().into_iter().flatten() {
            let spec = volume.as_str().unwrap();
            let mut parts = spec.split(':');
            let (source, target) = (parts.next().unwrap(), parts.next().unwrap_or(""));
            if target == "/etc/berth/berth.yaml" {
                check_config(Path::new(source), &env);
                checked += 1;
            }
        }
        if name.as_str().unwrap().starts_with("berth") {
            assert!(
                service["image"].as_str().unwrap().contains("berth"),
                "{name:?} runs {:?}",
                service["image"]
            );
        }
    }
    assert_eq!(
        checked, 3,
        "berth, berth-1 and berth-2 each mount a berth config"
    );

    // The load balancer and Prometheus name the services that exist.
    let nginx = std::fs::read_to_string(repo_root().join("deploy/compose/nginx.conf")).unwrap();
    for node in ["berth-1:5000", "berth-2:5000"] {
        assert!(
            nginx.contains(&format!("server {node};")),
            "nginx.conf lacks {node}"
        );
    }
    let prom: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo_root().join("deploy/compose/prometheus.yml")).unwrap(),
    )
    .unwrap();
    let targets: BTreeSet<String> = prom["scrape_configs"][0]["static_configs"][0]["targets"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        targets,
        strings(&["berth:9090", "berth-1:9090", "berth-2:9090"])
    );
}

// ---------------------------------------------------------------------------------------------
// Kubernetes

/// Whether kubectl runs (it has no `--version`); as `have_tool`, it is a failure unless
/// BERTH_SKIP_CLIENT_TESTS=1.
fn have_kubectl() -> bool {
    let ok = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("BERTH_SKIP_CLIENT_TESTS").as_deref() == Ok("1"),
            "kubectl is not installed: apt-get install -y kubernetes-client (or set \
             BERTH_SKIP_CLIENT_TESTS=1 to skip the tests that need it)"
        );
        eprintln!("SKIPPED: kubectl is not installed (BERTH_SKIP_CLIENT_TESTS=1)");
    }
    ok
}

/// Whether kubernetes-validate (PyPI) runs; as `have_tool`, it is a failure unless
/// BERTH_SKIP_CLIENT_TESTS=1.
fn have_kubernetes_validate() -> bool {
    let ok = Command::new("kubernetes-validate")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("BERTH_SKIP_CLIENT_TESTS").as_deref() == Ok("1"),
            "kubernetes-validate is not installed: python3 -m pip install kubernetes-validate \
             (or set BERTH_SKIP_CLIENT_TESTS=1 to skip the tests that need it)"
        );
        eprintln!("SKIPPED: kubernetes-validate is not installed (BERTH_SKIP_CLIENT_TESTS=1)");
    }
    ok
}

#[test]
fn kubernetes_overlays_render_validate_and_their_configs_pass_check_config() {
    if !have_kubectl() || !have_kubernetes_validate() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    for (overlay, workload) in [("single", "StatefulSet"), ("cluster", "Deployment")] {
        let dir = repo_root().join("deploy/kubernetes").join(overlay);
        let out = run(Command::new("kubectl").arg("kustomize").arg(&dir));
        let rendered = tmp.path().join(format!("{overlay}.yaml"));
        std::fs::write(&rendered, &out.stdout).unwrap();
        // Every object against the Kubernetes schemas, unknown fields rejected. The
        // ServiceMonitor is a CRD the schemas do not have: checked by hand below.
        let v = run(Command::new("kubernetes-validate")
            .args(["--strict", "--kubernetes-version", "1.32.0"])
            .arg(&rendered));
        let report =
            String::from_utf8_lossy(&v.stdout).into_owned() + &String::from_utf8_lossy(&v.stderr);
        let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_slice(&out.stdout)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .collect();
        let kinds: BTreeMap<String, &serde_yaml::Value> = docs
            .iter()
            .map(|d| (d["kind"].as_str().unwrap().to_string(), d))
            .collect();
        for kind in ["ConfigMap", "Service", workload, "PodDisruptionBudget"] {
            assert!(kinds.contains_key(kind), "{overlay}: no {kind}");
            assert!(
                report
                    .to_lowercase()
                    .contains(&format!("passed for resource {}/", kind.to_lowercase())),
                "{overlay}: {kind} not validated: {report}"
            );
        }

        // The pods: probes, resources, non-root, the config from the generated ConfigMap.
        let w = kinds[workload];
        let pod_labels = &w["spec"]["template"]["metadata"]["labels"];
        assert_eq!(pod_labels["app.kubernetes.io/name"], "berth", "{overlay}");
        let pod = &w["spec"]["template"]["spec"];
        let c = &pod["containers"][0];
        assert_eq!(
            c["livenessProbe"]["httpGet"]["path"], "/healthz",
            "{overlay}"
        );
        assert_eq!(
            c["readinessProbe"]["httpGet"]["path"], "/readyz",
            "{overlay}"
        );
        assert_eq!(
            c["livenessProbe"]["httpGet"]["port"], "metrics",
            "{overlay}"
        );
        assert_eq!(c["resources"]["requests"]["memory"], "64Mi", "{overlay}");
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{overlay}");
        let config_map = kinds["ConfigMap"];
        let cm_name = config_map["metadata"]["name"].as_str().unwrap();
        let config_volume = pod["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "config")
            .unwrap();
        assert_eq!(config_volume["configMap"]["name"], cm_name, "{overlay}");

        // Service, PodDisruptionBudget and ServiceMonitor select these pods.
        let service = kinds["Service"];
        for (k, v) in service["spec"]["selector"].as_mapping().unwrap() {
            assert_eq!(&pod_labels[k], v, "{overlay}: Service selector");
        }
        for (k, v) in kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]
            .as_mapping()
            .unwrap()
        {
            assert_eq!(&pod_labels[k], v, "{overlay}: PodDisruptionBudget selector");
        }
        let monitor = kinds["ServiceMonitor"];
        assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
        for (k, v) in monitor["spec"]["selector"]["matchLabels"]
            .as_mapping()
            .unwrap()
        {
            assert_eq!(
                &service["metadata"]["labels"][k], v,
                "{overlay}: ServiceMonitor selector"
            );
        }
        let port = &monitor["spec"]["endpoints"][0]["port"];
        assert!(
            service["spec"]["ports"]
                .as_sequence()
                .unwrap()
                .iter()
                .any(|p| &p["name"] == port),
            "{overlay}: the ServiceMonitor scrapes port {port:?}, which the Service lacks"
        );

        // The config inside passes check-config, with the environment the pod gets (Secret
        // values stand in as placeholders).
        let env: Vec<(String, String)> = c["env"]
            .as_sequence()
            .into_iter()
            .flatten()
            .map(|e| {
                (
                    e["name"].as_str().unwrap().to_string(),
                    "placeholder".to_string(),
                )
            })
            .collect();
        let config = tmp.path().join(format!("{overlay}-berth.yaml"));
        std::fs::write(&config, config_map["data"]["berth.yaml"].as_str().unwrap()).unwrap();
        check_config(&config, &env);
        if overlay == "cluster" {
            let secrets: BTreeSet<&str> = c["env"]
                .as_sequence()
                .unwrap()
                .iter()
                .filter_map(|e| e["valueFrom"]["secretKeyRef"]["name"].as_str())
                .collect();
            assert_eq!(secrets, BTreeSet::from(["berth-postgres", "berth-s3"]));
            assert!(w["spec"]["replicas"].as_u64().unwrap() > 1);
        }
    }
}

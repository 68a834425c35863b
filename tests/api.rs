//! The control API against running guests: `dvmm run --api-socket`, `dvmm ctl`.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dvmm_api::client::ApiClient;
use dvmm_api::{Counters, VmState};

const LIMIT: Duration = Duration::from_secs(600);

/// Clusters run one at a time (as in tests/cluster.rs): several at once on 2 cores
/// starve each other's DSM threads.
static ONE_CLUSTER: Mutex<()> = Mutex::new(());

fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner())
}

fn socket(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("dvmm-api-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

/// Starts `dvmm run` with `args`; its stdout lines are collected as they come.
fn spawn(args: &[&str]) -> (Child, Arc<Mutex<Vec<String>>>) {
    let mut child = Command::new(common::dvmm_bin())
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn dvmm");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let out = child.stdout.take().expect("stdout");
    {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(l);
            }
        });
    }
    (child, lines)
}

/// Waits until the API at `path` answers.
fn wait_for_api(path: &Path, child: &mut Child) -> ApiClient {
    let c = ApiClient::new(path);
    let t = Instant::now();
    loop {
        // The local cluster's socket answers before its nodes' do: ask for counters.
        if c.counters().is_ok() {
            return c;
        }
        assert!(child.try_wait().unwrap().is_none(), "dvmm ended early");
        assert!(t.elapsed() < LIMIT, "the API never answered");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn exits_by_vcpu(c: &Counters) -> Vec<(u32, u64)> {
    let mut v: Vec<(u32, u64)> = c
        .nodes
        .iter()
        .flat_map(|n| n.vcpus.iter().map(|v| (v.index, v.exits_total)))
        .collect();
    v.sort();
    v
}

fn total(c: &Counters) -> u64 {
    exits_by_vcpu(c).iter().map(|(_, n)| n).sum()
}

/// A port P with P+1 free too (node i of a local cluster serves metrics on P+i).
fn two_free_ports() -> u16 {
    loop {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = a.local_addr().unwrap().port();
        if p < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
}

fn scrape(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics port");
    dvmm_api::http::write_request(&mut s, "GET", "/metrics", b"").unwrap();
    let r = dvmm_api::http::read_response(&mut s).unwrap();
    assert_eq!(r.status, 200);
    String::from_utf8(r.body).unwrap()
}

/// The sum of the samples of `name` whose labels contain every one of `with`.
fn metric(text: &str, name: &str, with: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| with.iter().all(|w| l.contains(w)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `promtool check metrics` on a scrape: Prometheus' own linter.
fn promtool_check(text: &str) {
    let tool = match std::env::var("DVMM_PROMTOOL") {
        Ok(t) => PathBuf::from(t),
        Err(_) => {
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/promtool.sh");
            let out = Command::new(script).output().expect("scripts/promtool.sh");
            assert!(
                out.status.success(),
                "no promtool (scripts/promtool.sh fetches it from Debian's prometheus package): {}",
                String::from_utf8_lossy(&out.stderr)
            );
            PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
        }
    };
    let mut child = Command::new(&tool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    common::wait_within(child, within).unwrap_or_else(|| {
        let _ = child.kill();
        panic!("dvmm did not end within {within:?}")
    })
}

/// A pause through the one socket of a local cluster stops every vCPU on both nodes
/// (their exit counters, in the API and in the metrics, and the console stand still),
/// resume lets them go on, and the guest still passes. Each node's metrics pass
/// `promtool check metrics` and move while the guest runs.
#[test]
fn pausing_a_cluster_stops_every_vcpu_and_the_guest_still_passes() {
    let _one = exclusive();
    let path = socket("cluster");
    let p = path.to_str().unwrap();
    let port = two_free_ports();
    let metrics_addr = format!("127.0.0.1:{port}");
    let (mut child, lines) = spawn(&[
        "run",
        "--kernel",
        dvmm_testos::TESTOS_ELF,
        "--nodes",
        "2",
        "--cpus",
        "2",
        "--cmdline",
        "testos testos.iters=600 testos.watchdog=500",
        "--api-socket",
        p,
        "--metrics-addr",
        &metrics_addr,
    ]);
    let c = wait_for_api(&path, &mut child);
    let info = c.info().unwrap();
    assert_eq!(
        (info.nodes, info.vcpus, info.node),
        (2, 2, None),
        "{info:?}"
    );
    assert_eq!(info.state, VmState::Running);

    let a = c.counters().unwrap();
    assert_eq!(a.nodes.len(), 2, "{a:?}");
    assert_eq!(
        exits_by_vcpu(&a)
            .iter()
            .map(|(i, _)| *i)
            .collect::<Vec<_>>(),
        vec![0, 1]
    );
    // Pause only once testos's timing checks are over: the guest's TSC is not held
    // across a pause (this host ignores TSC offsets), so a check that counts timer
    // ticks against the TSC would see 1.5 s without ticks.
    let t = Instant::now();
    while !["cpu 0: spinlock ok", "cpu 1: spinlock ok"]
        .iter()
        .all(|w| lines.lock().unwrap().iter().any(|l| l.contains(w)))
    {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "testos never got past its timing checks"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    while total(&c.counters().unwrap()) == total(&a) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "counters never moved"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Until node 1's vCPU has started and fetched pages from node 0.
    let t = Instant::now();
    let (m0, m1) = loop {
        let (m0, m1) = (scrape(port), scrape(port + 1));
        if metric(&m1, "dvmm_vcpu_exits_total", &[]) > 0.0
            && metric(&m1, "dvmm_dsm_fault_wait_seconds_count", &[]) > 0.0
        {
            break (m0, m1);
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "node 1 never ran\n{m1}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    promtool_check(&m0);
    promtool_check(&m1);
    // Neither the API nor the metrics show the cluster secret (from the launcher's
    // private cluster file).
    let cluster_file = std::env::temp_dir()
        .join(format!("dvmm-{}", child.id()))
        .join("cluster.toml");
    let toml = std::fs::read_to_string(&cluster_file).unwrap();
    let secret = toml
        .lines()
        .find_map(|l| l.strip_prefix("secret = "))
        .map(|v| v.trim().trim_matches('"').to_string())
        .expect("a secret in the cluster file");
    assert!(secret.len() >= 16);
    let info_json = c.raw("GET", "/api/v1/vm.info", b"").unwrap().body;
    let counters_json = c.raw("GET", "/api/v1/vm.counters", b"").unwrap().body;
    for (what, text) in [
        ("node 0 metrics", m0.clone()),
        ("node 1 metrics", m1.clone()),
        ("vm.info", String::from_utf8_lossy(&info_json).into_owned()),
        (
            "vm.counters",
            String::from_utf8_lossy(&counters_json).into_owned(),
        ),
    ] {
        assert!(!text.contains(&secret), "{what} shows the cluster secret");
    }
    assert_eq!(metric(&m0, "dvmm_peer_up", &["peer=\"1\""]), 1.0, "{m0}");
    assert_eq!(metric(&m1, "dvmm_peer_up", &["peer=\"0\""]), 1.0, "{m1}");
    assert!(
        metric(&m1, "dvmm_vcpu_exits_total", &["vcpu=\"1\""]) > 0.0,
        "{m1}"
    );
    assert!(
        metric(&m1, "dvmm_dsm_pages_total", &["received"]) > 0.0,
        "node 1 got no page from node 0\n{m1}"
    );
    assert!(
        metric(&m1, "dvmm_dsm_fault_wait_seconds_count", &[]) > 0.0,
        "{m1}"
    );
    assert!(
        metric(&m0, "dvmm_peer_bytes_total", &["sent"]) > 0.0,
        "{m0}"
    );

    c.pause().unwrap();
    let paused_info = c.info().unwrap();
    assert_eq!(paused_info.state, VmState::Paused);
    let clock_at_pause = paused_info.guest_clock_ns.expect("the guest clock");
    let exits_metric = |port| metric(&scrape(port), "dvmm_vcpu_exits_total", &[]);
    let paused_metrics = (exits_metric(port), exits_metric(port + 1));
    assert_eq!(metric(&scrape(port + 1), "dvmm_vm_paused", &[]), 1.0);
    let before = c.counters().unwrap();
    let said = lines.lock().unwrap().len();
    std::thread::sleep(Duration::from_millis(1500));
    let after = c.counters().unwrap();
    assert_eq!(
        exits_by_vcpu(&before),
        exits_by_vcpu(&after),
        "a vCPU ran while paused"
    );
    assert_eq!(
        lines.lock().unwrap().len(),
        said,
        "the guest printed while paused"
    );
    assert!(
        lines.lock().unwrap().iter().all(|l| !l.contains("PASS")),
        "the guest finished before the pause: make it run longer"
    );
    for n in &after.nodes {
        assert!(
            n.paused_ns >= 1_000_000_000,
            "node {}: paused_ns {}",
            n.node,
            n.paused_ns
        );
    }
    assert_eq!(
        (exits_metric(port), exits_metric(port + 1)),
        paused_metrics,
        "the exit metrics moved while paused"
    );
    match c.pause() {
        Err(dvmm_api::ApiError::Refused {
            status: 409,
            message,
        }) => {
            assert!(message.contains("already paused"), "{message}")
        }
        other => panic!("a second pause: {other:?}"),
    }

    c.resume().unwrap();
    let resumed = c.info().unwrap();
    assert_eq!(resumed.state, VmState::Running);
    // The guest's clock did not see the 1.5 s pause.
    let advanced = resumed
        .guest_clock_ns
        .unwrap()
        .saturating_sub(clock_at_pause);
    assert!(
        advanced < 700_000_000,
        "the guest clock advanced {advanced} ns across a 1.5 s pause"
    );
    let st = wait_exit(&mut child, LIMIT);
    let out = lines.lock().unwrap().join("\n");
    assert!(
        out.contains(dvmm_testos::PASS_LINE),
        "no PASS after resume\n{out}"
    );
    assert!(!out.contains(dvmm_testos::FAIL_PREFIX), "{out}");
    assert_eq!(st.code(), Some(0), "{out}");
    assert!(!path.exists(), "the API socket outlived the VM");
}

/// One node: `dvmm ctl` reads the VM, a bad request gets a 4xx with a message, and
/// `ctl shutdown` ends the VM as a stop from outside does (130).
#[test]
fn ctl_reads_and_stops_a_single_node_vm() {
    let path = socket("single");
    let p = path.to_str().unwrap();
    let cmdline = format!("testos {}", dvmm_testos::CMDLINE_IDLE);
    let (mut child, lines) = spawn(&[
        "run",
        "--kernel",
        dvmm_testos::TESTOS_ELF,
        "--cmdline",
        &cmdline,
        "--api-socket",
        p,
    ]);
    let c = wait_for_api(&path, &mut child);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");

    let info = common::dvmm(&["ctl", "--api-socket", p, "info"], Duration::from_secs(30));
    assert_eq!(info.code, Some(0), "{}", info.transcript());
    let v: serde_json::Value = serde_json::from_str(&info.stdout).unwrap();
    assert_eq!(v["nodes"], 1, "{}", info.stdout);
    assert_eq!(v["node"], 0, "{}", info.stdout);
    assert_eq!(v["state"], "running", "{}", info.stdout);

    let r = c.raw("POST", "/api/v1/vm.pause", b"").unwrap();
    assert_eq!(r.status, 405);
    assert!(String::from_utf8_lossy(&r.body).contains("use PUT"));
    let r = c.raw("GET", "/api/v2/vm.info", b"").unwrap();
    assert_eq!(r.status, 404);
    assert!(String::from_utf8_lossy(&r.body).contains("no such endpoint"));

    let stop = common::dvmm(
        &["ctl", "--api-socket", p, "shutdown"],
        Duration::from_secs(30),
    );
    assert_eq!(stop.code, Some(0), "{}", stop.transcript());
    let st = wait_exit(&mut child, Duration::from_secs(60));
    assert_eq!(st.code(), Some(130), "{}", lines.lock().unwrap().join("\n"));
    assert!(!path.exists(), "the API socket outlived the VM");

    let gone = common::dvmm(&["ctl", "--api-socket", p, "info"], Duration::from_secs(30));
    assert_eq!(gone.code, Some(1));
    assert!(
        gone.stderr.contains("cannot reach the dvmm API at") && gone.stderr.contains(p),
        "{}",
        gone.transcript()
    );
}

/// A path that exists is never taken over: the run fails at once and the file stays.
#[test]
fn an_api_socket_path_that_exists_is_refused() {
    let path = socket("exists");
    std::fs::write(&path, b"mine").unwrap();
    for nodes in ["1", "2"] {
        let run = common::dvmm(
            &[
                "run",
                "--kernel",
                dvmm_testos::TESTOS_ELF,
                "--nodes",
                nodes,
                "--cpus",
                "2",
                "--api-socket",
                path.to_str().unwrap(),
            ],
            Duration::from_secs(60),
        );
        assert_eq!(run.code, Some(1), "{}", run.transcript());
        assert!(
            run.stderr.contains("already exists") && !run.stdout.contains("testos"),
            "{}",
            run.transcript()
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"mine");
    }
    std::fs::remove_file(&path).unwrap();
}

/// `dvmm top` in a real terminal (tmux) against a running 2-node cluster: both nodes,
/// their vCPUs and links, and the pages both nodes fault on, named from the guest's
/// symbols.
#[test]
fn top_shows_a_running_cluster_in_a_terminal() {
    let _one = exclusive();
    if Command::new("tmux").arg("-V").output().is_err() {
        panic!("needs tmux (apt-get install tmux)");
    }
    let path = socket("top");
    let p = path.to_str().unwrap();
    let map = std::env::temp_dir().join(format!("dvmm-top-{}.map", std::process::id()));
    let nm = Command::new("nm")
        .arg(dvmm_testos::TESTOS_ELF)
        .output()
        .expect("nm");
    assert!(nm.status.success());
    std::fs::write(&map, &nm.stdout).unwrap();
    let (mut child, _lines) = spawn(&[
        "run",
        "--kernel",
        dvmm_testos::TESTOS_ELF,
        "--nodes",
        "2",
        "--cpus",
        "2",
        "--cmdline",
        "testos testos.iters=2000 testos.watchdog=500",
        "--api-socket",
        p,
    ]);
    let c = wait_for_api(&path, &mut child);
    let session = format!("dvmm-top-{}", std::process::id());
    let top = format!(
        "{} top --api-socket {p} --system-map {} --interval 0.5",
        common::dvmm_bin(),
        map.display()
    );
    let ok = Command::new("tmux")
        .args([
            "new-session",
            "-d",
            "-s",
            &session,
            "-x",
            "150",
            "-y",
            "60",
            &top,
        ])
        .status()
        .unwrap();
    assert!(ok.success());
    let t = Instant::now();
    let mut screen = String::new();
    let mut seen_contended = false;
    while t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(500));
        let out = Command::new("tmux")
            .args(["capture-pane", "-p", "-t", &session])
            .output()
            .unwrap();
        screen = String::from_utf8_lossy(&out.stdout).into_owned();
        if screen.contains("CONTENDED") {
            seen_contended = true;
            break;
        }
    }
    let _ = Command::new("tmux")
        .args(["kill-session", "-t", &session])
        .status();
    let _ = c.shutdown();
    let _ = wait_exit(&mut child, Duration::from_secs(60));
    let _ = std::fs::remove_file(&map);
    assert!(
        screen.contains("dvmm top: 2 node(s), 2 vCPU(s), 256 MiB"),
        "{screen}"
    );
    assert!(
        screen.contains("->1 ") && screen.contains("->0 "),
        "links\n{screen}"
    );
    assert!(seen_contended, "no page both nodes fault on\n{screen}");
    let line = screen.lines().find(|l| l.contains("CONTENDED")).unwrap();
    assert!(
        line.contains("n0 ") && line.contains("n1 "),
        "a contended page names both nodes: {line}"
    );
    let named = line.split_whitespace().rev().nth(1).unwrap_or("");
    assert!(
        !named.is_empty() && !named.contains('/'),
        "the contended page is named from the guest's symbols: {line}"
    );
}

/// `--report` after a 2-node run: the pages both nodes write are listed with the guest
/// symbol they hold and called out as write-shared; the data is beside it as JSON.
#[test]
fn the_report_names_pages_two_nodes_write_and_says_so() {
    let _one = exclusive();
    let dir = std::env::temp_dir().join(format!("dvmm-report-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let map = dir.join("testos.map");
    let nm = Command::new("nm")
        .arg(dvmm_testos::TESTOS_ELF)
        .output()
        .expect("nm");
    std::fs::write(&map, &nm.stdout).unwrap();
    let report = dir.join("report.txt");
    let run = common::dvmm(
        &[
            "run",
            "--kernel",
            dvmm_testos::TESTOS_ELF,
            "--nodes",
            "2",
            "--cpus",
            "2",
            "--cmdline",
            "testos testos.iters=200 testos.watchdog=500",
            "--report",
            report.to_str().unwrap(),
            "--system-map",
            map.to_str().unwrap(),
        ],
        LIMIT,
    );
    assert_eq!(run.code, Some(0), "{}", run.transcript());
    let text = std::fs::read_to_string(&report).unwrap();
    assert!(
        text.starts_with("dvmm run report: 2 node(s), 2 vCPU(s)"),
        "{text}"
    );
    assert!(text.contains("ended: power off"), "{text}");
    for node in ["node 0:", "node 1:"] {
        assert!(text.contains(node), "{node}\n{text}");
    }
    // testos's IRIW litmus test writes its log page from both nodes.
    let line = text
        .lines()
        .find(|l| l.contains("(dsm_iriw_logs):"))
        .unwrap_or_else(|| panic!("no contended dsm_iriw_logs\n{text}"));
    assert!(
        line.contains("node 0 ") && line.contains("node 1 "),
        "{line}"
    );
    assert!(
        text.contains("(dsm_iriw_logs) is written by vCPUs on nodes 0 and 1"),
        "{text}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("report.txt.json")).unwrap()).unwrap();
    assert_eq!(json.as_array().map(Vec::len), Some(2), "{json}");
    let _ = std::fs::remove_dir_all(&dir);
}

use super::*;
use crate::client::ApiClient;
use crate::server::ApiServer;
use serde_json::Value;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// A backend that records what it was asked and pauses a pretend VM.
#[derive(Default)]
struct FakeVm {
    paused: Mutex<bool>,
    shut: Mutex<bool>,
}

impl VmApi for FakeVm {
    fn info(&self) -> Result<VmInfo, ApiFailure> {
        Ok(VmInfo {
            state: if *self.paused.lock().unwrap() {
                VmState::Paused
            } else {
                VmState::Running
            },
            nodes: 2,
            node: Some(1),
            vcpus: 4,
            local_vcpus: vec![2, 3],
            memory_bytes: 1 << 30,
            kernel: "bzImage".into(),
            version: "test".into(),
            guest_clock_ns: Some(5),
        })
    }
    fn pause(&self) -> Result<(), ApiFailure> {
        let mut p = self.paused.lock().unwrap();
        if *p {
            return Err(ApiFailure::conflict("the VM is already paused"));
        }
        *p = true;
        Ok(())
    }
    fn resume(&self) -> Result<(), ApiFailure> {
        let mut p = self.paused.lock().unwrap();
        if !*p {
            return Err(ApiFailure::conflict("the VM is not paused"));
        }
        *p = false;
        Ok(())
    }
    fn shutdown(&self) -> Result<(), ApiFailure> {
        *self.shut.lock().unwrap() = true;
        Ok(())
    }
    fn counters(&self) -> Result<Counters, ApiFailure> {
        Ok(Counters {
            nodes: vec![NodeCounters {
                node: 1,
                vcpus: vec![VcpuCounters {
                    index: 2,
                    exits_total: 7,
                    exits: [("pio".to_string(), 7)].into(),
                }],
                dsm: [("read_faults".to_string(), 3)].into(),
                paused_ns: 0,
                hot_pages: vec![HotPage {
                    gpa: 0x1000,
                    read_faults: 2,
                    write_faults: 1,
                }],
                peers: vec![PeerCounters {
                    peer: 0,
                    up: true,
                    bytes_sent: 10,
                    bytes_received: 20,
                    rtt_ns: 30,
                }],
            }],
        })
    }
}

fn socket_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("dvmm-api-{tag}-{}", std::process::id()))
}

fn start(tag: &str) -> (ApiServer, Arc<FakeVm>, ApiClient) {
    let path = socket_path(tag);
    let _ = std::fs::remove_file(&path);
    let vm = Arc::new(FakeVm::default());
    let server = ApiServer::start(&path, vm.clone()).unwrap();
    (server, vm, ApiClient::new(&path))
}

fn openapi() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/api/openapi.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Follows a `$ref` within the document.
fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let mut at = doc;
            for part in r.trim_start_matches("#/").split('/') {
                at = &at[part];
            }
            assert!(!at.is_null(), "dangling $ref {r}");
            resolve(doc, at)
        }
        None => v,
    }
}

/// Checks `value` against the parts of an OpenAPI schema the document uses: types,
/// required properties, enums, items and additionalProperties.
fn conforms(doc: &Value, schema: &Value, value: &Value, at: &str) {
    let schema = resolve(doc, schema);
    match schema["type"].as_str() {
        Some("object") => {
            let obj = value
                .as_object()
                .unwrap_or_else(|| panic!("{at}: {value} is not an object"));
            for r in schema["required"].as_array().into_iter().flatten() {
                let r = r.as_str().unwrap();
                assert!(obj.contains_key(r), "{at}: required property {r} missing");
            }
            for (k, v) in obj {
                match schema["properties"].get(k) {
                    Some(s) => conforms(doc, s, v, &format!("{at}.{k}")),
                    None => match schema.get("additionalProperties") {
                        Some(s) => conforms(doc, s, v, &format!("{at}.{k}")),
                        None => panic!("{at}: property {k} is not in the document"),
                    },
                }
            }
        }
        Some("array") => {
            for (i, v) in value
                .as_array()
                .unwrap_or_else(|| panic!("{at}: not an array"))
                .iter()
                .enumerate()
            {
                conforms(doc, &schema["items"], v, &format!("{at}[{i}]"));
            }
        }
        Some("integer") => assert!(
            value.is_u64() || value.is_i64(),
            "{at}: {value} not an integer"
        ),
        Some("boolean") => assert!(value.is_boolean(), "{at}: {value} not a boolean"),
        Some("string") => {
            let s = value
                .as_str()
                .unwrap_or_else(|| panic!("{at}: {value} not a string"));
            if let Some(e) = schema["enum"].as_array() {
                assert!(e.iter().any(|x| x == s), "{at}: {s} not in {e:?}");
            }
        }
        other => panic!("{at}: schema type {other:?} not handled by this check"),
    }
}

#[test]
fn the_server_answers_every_route_as_the_openapi_document_says() {
    let doc = openapi();
    let paths = doc["paths"].as_object().unwrap();
    // The document and the server know the same routes.
    let mut documented = Vec::new();
    for (p, ops) in paths {
        for m in ops.as_object().unwrap().keys() {
            documented.push((m.to_uppercase(), p.clone()));
        }
    }
    let mut served: Vec<(String, String)> = ROUTES
        .iter()
        .map(|(m, p, _)| (m.as_str().to_string(), p.to_string()))
        .collect();
    documented.sort();
    served.sort();
    assert_eq!(
        documented, served,
        "docs/api/openapi.json and ROUTES differ"
    );

    let (_server, _vm, client) = start("openapi");
    // In an order that makes every call succeed (pause before resume).
    for action in [
        Action::Ping,
        Action::Info,
        Action::Counters,
        Action::Pause,
        Action::Info,
        Action::Resume,
        Action::Shutdown,
    ] {
        let (method, path) = route_of(action);
        let r = client.raw(method.as_str(), path, b"").unwrap();
        let op = &paths[path][method.as_str().to_lowercase()];
        let resp = op["responses"]
            .get(r.status.to_string())
            .unwrap_or_else(|| panic!("{path}: status {} not documented", r.status));
        let resp = resolve(&doc, resp);
        match resp["content"]["application/json"].get("schema") {
            Some(schema) => {
                let v: Value = serde_json::from_slice(&r.body).unwrap();
                conforms(&doc, schema, &v, path);
            }
            None => assert!(r.body.is_empty(), "{path}: undocumented body"),
        }
    }
    // A refusal is documented too, and its body is the Error schema.
    let (method, path) = route_of(Action::Resume);
    let r = client.raw(method.as_str(), path, b"").unwrap();
    assert_eq!(r.status, 409);
    let resp = resolve(&doc, &paths[path]["put"]["responses"]["409"]);
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    conforms(
        &doc,
        &resp["content"]["application/json"]["schema"],
        &v,
        path,
    );
}

#[test]
fn the_client_drives_the_backend() {
    let (_server, vm, client) = start("drive");
    assert_eq!(client.ping().unwrap().version, env!("CARGO_PKG_VERSION"));
    assert_eq!(client.info().unwrap().state, VmState::Running);
    client.pause().unwrap();
    assert_eq!(client.info().unwrap().state, VmState::Paused);
    match client.pause() {
        Err(ApiError::Refused {
            status: 409,
            message,
        }) => {
            assert!(message.contains("already paused"), "{message}")
        }
        other => panic!("pausing twice: {other:?}"),
    }
    client.resume().unwrap();
    assert_eq!(client.counters().unwrap().nodes[0].vcpus[0].exits["pio"], 7);
    client.shutdown().unwrap();
    assert!(*vm.shut.lock().unwrap());
}

#[test]
fn bad_requests_get_a_4xx_with_a_message() {
    let (server, _vm, client) = start("bad");
    let cases: [(&str, &str, &[u8], u16, &str); 4] = [
        ("GET", "/api/v1/vm.nothing", b"", 404, "no such endpoint"),
        ("GET", "/api/v1/vm.pause", b"", 405, "use PUT"),
        (
            "PUT",
            "/api/v1/vm.pause",
            b"{\"x\":1}",
            400,
            "takes no request body",
        ),
        ("DELETE", "/api/v1/vm.info", b"", 405, "use GET"),
    ];
    for (m, p, body, status, msg) in cases {
        let r = client.raw(m, p, body).unwrap();
        assert_eq!(r.status, status, "{m} {p}");
        let e: model::ErrorBody = serde_json::from_slice(&r.body).unwrap();
        assert!(e.error.contains(msg), "{m} {p}: {}", e.error);
    }
    // Not HTTP at all.
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(server.path()).unwrap();
    s.write_all(b"\x00\x01 hello\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 400 "), "{out}");
    assert!(out.contains("not an HTTP/1.1 request"), "{out}");
}

#[test]
fn the_socket_is_private_and_never_replaces_a_path() {
    use std::os::unix::fs::PermissionsExt;
    let (server, _vm, _client) = start("private");
    let mode = std::fs::metadata(server.path())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
    match ApiServer::start(server.path(), Arc::new(FakeVm::default())) {
        Err(ApiError::SocketExists(p)) => assert_eq!(p, server.path()),
        Err(e) => panic!("second server on one path: {e}"),
        Ok(_) => panic!("second server on one path started"),
    }
    let file = socket_path("plainfile");
    std::fs::write(&file, b"keep me").unwrap();
    assert!(matches!(
        ApiServer::start(&file, Arc::new(FakeVm::default())),
        Err(ApiError::SocketExists(_))
    ));
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    std::fs::remove_file(&file).unwrap();
    let path = server.path().to_path_buf();
    drop(server);
    assert!(!path.exists(), "the socket file outlived its server");
}

#[test]
fn a_dead_socket_gives_a_clear_client_error() {
    let path = socket_path("dead");
    let _ = std::fs::remove_file(&path);
    let e = ApiClient::new(&path).info().unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("cannot reach the dvmm API at") && msg.contains("is the VM running"),
        "{msg}"
    );
}

//! Prometheus metrics: the text exposition format (version 0.0.4) and an HTTP endpoint
//! that serves it at `/metrics`.
//!
//! A [`MetricsSource`] writes its families into an [`Exposition`] on every scrape; the
//! builder takes care of `# HELP`/`# TYPE` lines, label escaping and histogram buckets,
//! so that a source only says what it measures.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use crate::http;
use crate::ApiError;

/// A metric family's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (names end in `_total`).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Observations in cumulative buckets, with `_sum` and `_count`.
    Histogram,
}

/// One scrape's text, built family by family.
#[derive(Default)]
pub struct Exposition {
    out: String,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('\n', "\\n")
        .replace('"', "\\\"")
}

fn labels(l: &[(&str, &str)], extra: Option<(&str, &str)>) -> String {
    let all: Vec<String> = l
        .iter()
        .copied()
        .chain(extra)
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    if all.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", all.join(","))
    }
}

impl Exposition {
    /// Starts a family: its help text and type. Samples of it follow.
    pub fn family(&mut self, name: &str, help: &str, kind: Kind) {
        let t = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {t}");
    }

    /// One sample of a counter or gauge.
    pub fn sample(&mut self, name: &str, l: &[(&str, &str)], value: f64) {
        let _ = writeln!(self.out, "{name}{} {value}", labels(l, None));
    }

    /// A counter or gauge family with one sample per entry of `samples`.
    pub fn simple(
        &mut self,
        name: &str,
        help: &str,
        kind: Kind,
        samples: &[(Vec<(&str, &str)>, f64)],
    ) {
        self.family(name, help, kind);
        for (l, v) in samples {
            self.sample(name, l, *v);
        }
    }

    /// One histogram series: `buckets` are (upper bound, observations in that bucket
    /// only); `count` includes observations above the last bound.
    pub fn histogram(
        &mut self,
        name: &str,
        l: &[(&str, &str)],
        buckets: &[(f64, u64)],
        sum: f64,
        count: u64,
    ) {
        let mut cumulative = 0u64;
        for (le, n) in buckets {
            cumulative += n;
            let le = format!("{le}");
            let _ = writeln!(
                self.out,
                "{name}_bucket{} {cumulative}",
                labels(l, Some(("le", &le)))
            );
        }
        let _ = writeln!(
            self.out,
            "{name}_bucket{} {count}",
            labels(l, Some(("le", "+Inf")))
        );
        let _ = writeln!(self.out, "{name}_sum{} {sum}", labels(l, None));
        let _ = writeln!(self.out, "{name}_count{} {count}", labels(l, None));
    }

    /// The text so far.
    pub fn text(&self) -> &str {
        &self.out
    }
}

/// Whatever has metrics to show.
pub trait MetricsSource: Send + Sync {
    /// Writes the current values.
    fn collect(&self, e: &mut Exposition);
}

/// `--metrics-addr`'s value: `HOST:PORT`, or `PORT` alone for loopback.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.parse::<SocketAddr>()
        .map_err(|_| format!("{s:?} is not HOST:PORT or PORT (e.g. 127.0.0.1:9464, or [::1]:9464)"))
}

/// A listening metrics endpoint; dropping it stops answering.
pub struct MetricsServer {
    addr: SocketAddr,
    listener: Arc<TcpListener>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A bound metrics port, not yet answering: made early so that a port in use fails
/// before anything else starts.
pub struct MetricsListener {
    addr: SocketAddr,
    listener: TcpListener,
}

impl MetricsListener {
    /// Listens on `addr`.
    pub fn bind(addr: SocketAddr) -> Result<MetricsListener, ApiError> {
        let listener =
            TcpListener::bind(addr).map_err(|source| ApiError::MetricsBind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| ApiError::MetricsBind { addr, source })?;
        Ok(MetricsListener { addr, listener })
    }

    /// Where it listens (the port chosen when 0 was asked).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Starts answering `GET /metrics` from `source`.
    pub fn serve(self, source: Arc<dyn MetricsSource>) -> Result<MetricsServer, ApiError> {
        MetricsServer::serve(self, source)
    }
}

impl MetricsServer {
    /// Serves `GET /metrics` on `addr` from `source`.
    pub fn start(
        addr: SocketAddr,
        source: Arc<dyn MetricsSource>,
    ) -> Result<MetricsServer, ApiError> {
        MetricsListener::bind(addr)?.serve(source)
    }

    fn serve(
        l: MetricsListener,
        source: Arc<dyn MetricsSource>,
    ) -> Result<MetricsServer, ApiError> {
        let addr = l.addr;
        if !addr.ip().is_loopback() {
            tracing::warn!(%addr, "metrics are served beyond this host (not a loopback address)");
        }
        let listener = Arc::new(l.listener);
        let l = listener.clone();
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || http::serve_each(l.incoming(), "metrics", |s| serve(s, &*source)))
            .map_err(ApiError::Thread)?;
        tracing::info!(%addr, "metrics at http://{addr}/metrics");
        Ok(MetricsServer {
            addr,
            listener,
            thread: Some(thread),
        })
    }

    /// Where it listens (the port chosen when 0 was asked).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: shutting down a listening socket we own wakes the accept thread
        // (Linux: accept returns EINVAL); the descriptor stays open until `listener` goes.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(mut s: TcpStream, source: &dyn MetricsSource) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
    let (status, body, kind) = match http::read_request(&mut s) {
        Ok(r) if r.method == "GET" && r.path == "/metrics" => {
            let mut e = Exposition::default();
            source.collect(&mut e);
            (
                200,
                e.out.into_bytes(),
                "text/plain; version=0.0.4; charset=utf-8",
            )
        }
        Ok(r) if r.path == "/metrics" => (405, b"use GET\n".to_vec(), "text/plain"),
        Ok(_) => (404, b"metrics are at /metrics\n".to_vec(), "text/plain"),
        Err(e) => (400, format!("{e}\n").into_bytes(), "text/plain"),
    };
    let _ = http::write_response_typed(&mut s, status, kind, &body);
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;

    impl MetricsSource for Fixed {
        fn collect(&self, e: &mut Exposition) {
            e.simple(
                "dvmm_things_total",
                "Things.",
                Kind::Counter,
                &[(vec![("vcpu", "0"), ("kind", "a\"b")], 3.0)],
            );
            e.family("dvmm_wait_seconds", "Waits.", Kind::Histogram);
            e.histogram("dvmm_wait_seconds", &[], &[(0.001, 2), (0.01, 1)], 0.5, 4);
        }
    }

    #[test]
    fn the_text_format_has_types_escapes_and_cumulative_buckets() {
        let mut e = Exposition::default();
        Fixed.collect(&mut e);
        let t = e.text();
        assert!(t.contains("# TYPE dvmm_things_total counter\n"), "{t}");
        assert!(
            t.contains("dvmm_things_total{vcpu=\"0\",kind=\"a\\\"b\"} 3\n"),
            "{t}"
        );
        assert!(
            t.contains("dvmm_wait_seconds_bucket{le=\"0.001\"} 2\n"),
            "{t}"
        );
        assert!(
            t.contains("dvmm_wait_seconds_bucket{le=\"0.01\"} 3\n"),
            "{t}"
        );
        assert!(
            t.contains("dvmm_wait_seconds_bucket{le=\"+Inf\"} 4\n"),
            "{t}"
        );
        assert!(t.contains("dvmm_wait_seconds_count 4\n"), "{t}");
    }

    #[test]
    fn the_endpoint_serves_metrics_and_only_them() {
        let s = MetricsServer::start(parse_addr("0").unwrap(), Arc::new(Fixed)).unwrap();
        assert!(s.addr().ip().is_loopback());
        let get = |path: &str| {
            let mut c = TcpStream::connect(s.addr()).unwrap();
            http::write_request(&mut c, "GET", path, b"").unwrap();
            http::read_response(&mut c).unwrap()
        };
        let r = get("/metrics");
        assert_eq!(r.status, 200);
        assert!(String::from_utf8_lossy(&r.body).contains("dvmm_things_total"));
        assert_eq!(get("/").status, 404);
    }

    #[test]
    fn addresses_default_to_loopback() {
        assert_eq!(
            parse_addr("9464").unwrap(),
            "127.0.0.1:9464".parse().unwrap()
        );
        assert_eq!(parse_addr("[::1]:80").unwrap(), "[::1]:80".parse().unwrap());
        assert!(parse_addr("localhost").unwrap_err().contains("HOST:PORT"));
    }
}

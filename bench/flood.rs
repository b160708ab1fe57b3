//! Load on the password step (`POST /_portcullis/login`), for a bounded time: the load generator
//! of `bench/signin.sh`, for its sign-in throughput (`--user` and `--password`: the right one)
//! and for its credential-stuffing flood (wrong passwords, many addresses).
//!
//! `bench-flood GW --seconds S --clients C [--rate R] [--sources NETS HOSTS] [--users N]
//!  [--target EMAIL --target-share F] [--user EMAIL] [--password P] [--pid PID]`
//!
//! Each of C clients keeps one HTTP/1.1 connection and posts the sign-in form, with a made-up
//! wrong password unless `--password` is given (one CSRF cookie and token fetched at the start,
//! as a scripted client would). With
//! `--sources` the connections are bound to loopback addresses 127.10.n.h (n < NETS, 1 ≤ h ≤
//! HOSTS; Linux routes all of 127.0.0.0/8 to loopback), a new address every 20 attempts, so the
//! gateway sees many addresses in NETS different /24 networks. `--rate` caps the attempts per
//! second over all clients. Usernames are N made-up ones, plus `--target` in the given share of
//! attempts. `--pid`: report the CPU seconds that process used during the run. Prints one JSON
//! object: attempts, attempts/s, answers by status, latency percentiles.
//!
//! Written in Rust (not a script) so that on a small machine the generator takes as little CPU
//! as possible from the gateway and the browsing it is measured against.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

#[derive(Parser)]
struct Args {
    /// The gateway, host:port.
    gw: SocketAddr,
    #[arg(long, default_value_t = 20.0)]
    seconds: f64,
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Attempts per second over all clients (0: as fast as answers come).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// NETS HOSTS: source addresses 127.10.n.h.
    #[arg(long, num_args = 2, value_names = ["NETS", "HOSTS"])]
    sources: Option<Vec<u16>>,
    /// Made-up usernames.
    #[arg(long, default_value_t = 5000)]
    users: usize,
    #[arg(long)]
    target: Option<String>,
    #[arg(long, default_value_t = 0.0)]
    target_share: f64,
    /// Always this username (instead of made-up ones).
    #[arg(long)]
    user: Option<String>,
    /// Always this password (instead of made-up wrong ones).
    #[arg(long)]
    password: Option<String>,
    #[arg(long)]
    pid: Option<u32>,
}

/// Answers by status, latencies, connection errors.
#[derive(Default)]
struct Tally {
    by_status: BTreeMap<u16, u64>,
    latencies: Vec<Duration>,
    errors: u64,
}

/// One response: status and whether the server will close the connection.
async fn exchange(
    stream: &mut TcpStream,
    request: &[u8],
    buf: &mut Vec<u8>,
) -> std::io::Result<(u16, bool)> {
    stream.write_all(request).await?;
    buf.clear();
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let mut chunk = [0u8; 8192];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(bad("connection closed"));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status"))?;
    let header = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':').map(str::trim))
            .map(str::to_string)
    };
    let close = header("connection").is_some_and(|v| v == "close");
    let length: usize = match header("content-length") {
        Some(v) => v.parse().map_err(|_| bad("content-length"))?,
        None if header("transfer-encoding").is_some() => {
            return Err(bad("chunked answers are not expected here"))
        }
        None => 0,
    };
    let mut have = buf.len() - head_end;
    while have < length {
        let mut chunk = [0u8; 8192];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(bad("body cut short"));
        }
        have += n;
    }
    Ok((status, close))
}

/// The CSRF cookie and form token from the sign-in page.
async fn csrf(gw: SocketAddr) -> std::io::Result<(String, String)> {
    let mut s = TcpStream::connect(gw).await?;
    s.write_all(
        format!("GET /_portcullis/login HTTP/1.1\r\nHost: {gw}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut all = Vec::new();
    s.read_to_end(&mut all).await?;
    let text = String::from_utf8_lossy(&all);
    let missing = |what: &str| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("no {what} on the sign-in page"),
        )
    };
    let cookie = text
        .lines()
        .filter_map(|l| {
            l.strip_prefix("set-cookie: ")
                .or_else(|| l.strip_prefix("Set-Cookie: "))
        })
        .map(|c| c.split(';').next().unwrap_or_default())
        .find(|c| c.split('=').next().is_some_and(|n| n.contains("csrf")))
        .ok_or_else(|| missing("CSRF cookie"))?
        .to_string();
    let token = text
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .ok_or_else(|| missing("CSRF token"))?
        .to_string();
    Ok((cookie, token))
}

fn cpu_seconds(pid: Option<u32>) -> f64 {
    let Some(pid) = pid else { return 0.0 };
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
        .sum();
    ticks / 100.0
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = Args::parse();
    let (cookie, token) = csrf(a.gw).await?;
    let names: Arc<Vec<String>> = Arc::new(match &a.user {
        Some(u) => vec![u.clone()],
        None => (0..a.users)
            .map(|i| format!("customer{i}@example.net"))
            .collect(),
    });
    let sources: Option<Arc<Vec<SocketAddr>>> = a.sources.as_ref().map(|s| {
        let mut v: Vec<SocketAddr> = (0..s[0])
            .flat_map(|n| {
                (1..=s[1]).map(move |h| SocketAddr::from(([127, 10, n as u8, h as u8], 0)))
            })
            .collect();
        v.shuffle(&mut rand::thread_rng());
        Arc::new(v)
    });
    let next_source = Arc::new(AtomicUsize::new(0));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(a.seconds);
    let interval = (a.rate > 0.0).then(|| Duration::from_secs_f64(a.clients as f64 / a.rate));
    let cpu0 = cpu_seconds(a.pid);

    let mut tasks = Vec::new();
    for _ in 0..a.clients {
        let (names, sources, next_source, tally) = (
            names.clone(),
            sources.clone(),
            next_source.clone(),
            tally.clone(),
        );
        let (cookie, token, target, share, gw) = (
            cookie.clone(),
            token.clone(),
            a.target.clone(),
            a.target_share,
            a.gw,
        );
        let password = a.password.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::from_entropy();
            let mut due = Instant::now() + interval.map_or(Duration::ZERO, |i| i.mul_f64(rng.gen()));
            let mut buf = Vec::with_capacity(16384);
            let mut local = Tally::default();
            while Instant::now() < deadline {
                let connected = match &sources {
                    Some(s) => {
                        let src = s[next_source.fetch_add(1, Ordering::Relaxed) % s.len()];
                        async {
                            let sock = TcpSocket::new_v4()?;
                            sock.bind(src)?;
                            sock.connect(gw).await
                        }
                        .await
                    }
                    None => TcpStream::connect(gw).await,
                };
                let mut stream = match connected {
                    Ok(s) => s,
                    Err(_) => {
                        local.errors += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                for _ in 0..if sources.is_some() { 20 } else { usize::MAX } {
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    if let Some(i) = interval {
                        if due > now {
                            tokio::time::sleep(due - now).await;
                        }
                        due = (due + i).max(Instant::now() - i);
                    }
                    let user = match &target {
                        Some(t) if rng.gen::<f64>() < share => t.as_str(),
                        _ => names[rng.gen_range(0..names.len())].as_str(),
                    };
                    let body: String = url::form_urlencoded::Serializer::new(String::new())
                        .append_pair("username", user)
                        .append_pair(
                            "password",
                            &password.clone().unwrap_or_else(|| format!("Summer{}!", rng.gen_range(1000..10000))),
                        )
                        .append_pair("csrf", &token)
                        .append_pair("next", "")
                        .finish();
                    let request = format!(
                        "POST /_portcullis/login HTTP/1.1\r\nHost: {gw}\r\nCookie: {cookie}\r\nAccept: application/json\r\n\
                         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    let t0 = Instant::now();
                    match tokio::time::timeout(Duration::from_secs(30), exchange(&mut stream, request.as_bytes(), &mut buf)).await {
                        Ok(Ok((status, close))) => {
                            local.latencies.push(t0.elapsed());
                            *local.by_status.entry(status).or_default() += 1;
                            if close {
                                break;
                            }
                        }
                        _ => {
                            local.errors += 1;
                            break;
                        }
                    }
                }
            }
            let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
            for (k, v) in local.by_status {
                *t.by_status.entry(k).or_default() += v;
            }
            t.latencies.extend(local.latencies);
            t.errors += local.errors;
        }));
    }
    for t in tasks {
        t.await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(a.pid) - cpu0;
    let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
    t.latencies.sort();
    let total: u64 = t.by_status.values().sum();
    let pct = |p: f64| {
        t.latencies
            .get(((p * t.latencies.len() as f64) as usize).min(t.latencies.len().saturating_sub(1)))
            .map(|d| (d.as_secs_f64() * 10_000.0).round() / 10.0)
    };
    let mut out = serde_json::json!({
        "attempts": total,
        "seconds": (elapsed * 10.0).round() / 10.0,
        "attempts_per_s": ((total as f64 / elapsed) * 10.0).round() / 10.0,
        "by_status": t.by_status.iter().map(|(k, v)| (k.to_string(), *v)).collect::<BTreeMap<_, _>>(),
        "connection_errors": t.errors,
        "p50_ms": pct(0.5),
        "p99_ms": pct(0.99),
        "sources": sources.map_or(1, |s| s.len()),
    });
    if a.pid.is_some() {
        out["gateway_cpu_seconds"] = serde_json::json!((cpu * 100.0).round() / 100.0);
        let accepted: u64 = [200, 303].iter().filter_map(|s| t.by_status.get(s)).sum();
        if accepted > 0 {
            out["gateway_cpu_seconds_per_accepted_attempt"] =
                serde_json::json!((cpu / accepted as f64 * 10_000.0).round() / 10_000.0);
        }
    }
    println!("{out}");
    Ok(())
}

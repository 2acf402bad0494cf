//! `mock-upstream --listen 127.0.0.1:18080`: the mock OpenAI / Anthropic / MCP upstream as a
//! process, for load tests and manual runs. Prints `listening on <addr>` once bound (port 0
//! picks a free port) and serves until SIGINT or SIGTERM. Records nothing.

use std::net::SocketAddr;
use std::process::ExitCode;

const USAGE: &str = "usage: mock-upstream [--listen ADDR]   (default 127.0.0.1:18080)";
const DEFAULT_LISTEN: &str = "127.0.0.1:18080";

#[tokio::main]
async fn main() -> ExitCode {
    let addr = match listen_addr(std::env::args().skip(1)) {
        Ok(addr) => addr,
        Err(message) => {
            eprintln!("{message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let listener = match tollgate::server::bind(addr) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("mock-upstream: cannot bind {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    match listener.local_addr() {
        Ok(bound) => println!("listening on {bound}"),
        Err(e) => {
            eprintln!("mock-upstream: no local address: {e}");
            return ExitCode::FAILURE;
        }
    }
    tollgate_e2e::mock::serve(listener, stop_signal()).await;
    ExitCode::SUCCESS
}

fn listen_addr(mut args: impl Iterator<Item = String>) -> Result<SocketAddr, String> {
    let mut listen = DEFAULT_LISTEN.to_owned();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => listen = args.next().ok_or("--listen needs an address")?,
            "-h" | "--help" => return Err("mock-upstream: the mock LLM and tool upstream".into()),
            other => match other.strip_prefix("--listen=") {
                Some(value) => listen = value.to_owned(),
                None => return Err(format!("unknown argument {other:?}")),
            },
        }
    }
    listen.parse().map_err(|e| format!("bad --listen address {listen:?}: {e}"))
}

async fn stop_signal() {
    let interrupt = async {
        // If the handler cannot be installed, never stop rather than stop at once.
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    () = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => interrupt.await,
        }
    }
    #[cfg(not(unix))]
    interrupt.await;
}

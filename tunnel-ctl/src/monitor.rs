//! `tunnel-ctl monitor`: attaches the counting programs to interfaces and serves the counters.
use std::{
    sync::{Arc, Mutex},
    time::Instant,
};

use anyhow::Result;
use aya::Ebpf;
use tracing::info;
use tunnel_common::names::{PROG_MONITOR_EGRESS, PROG_MONITOR_INGRESS};

use crate::{
    config::MonitorConfig,
    dataplane::{self, bpffs, tc::Direction},
    instance::Instance,
    mgmt::{self, Handler, Request, Response, Status, api},
};

struct Monitor {
    instance: Instance,
    ebpf: Mutex<Ebpf>,
    devs: Vec<String>,
    directions: Vec<Direction>,
    started: Instant,
}

impl Handler for Monitor {
    fn handle(&self, request: Request) -> Response {
        match request {
            Request::Status => Status::Monitor(api::MonitorStatus {
                process: api::Process::now(&self.instance, self.started),
                interfaces: self.devs.clone(),
                directions: self.directions.iter().map(|d| d.as_str()).collect(),
                pin_dir: self.instance.pin_dir(),
            })
            .into(),
            Request::Stats => {
                let ebpf = self.ebpf.lock().unwrap_or_else(|p| p.into_inner());
                mgmt::counters_response(Default::default(), Some(dataplane::stats::read(&ebpf)))
            }
            other => mgmt::not_supported("monitor", &other),
        }
    }
}

pub async fn run(args: MonitorConfig) -> Result<()> {
    let instance = args.instance.clone();
    crate::daemon::claim(&instance)?;
    let pin_dir = instance.pin_dir();
    let directions = args.directions.clone();

    let metrics = args.metrics;
    let mut ebpf =
        dataplane::load_without(&pin_dir, &[dataplane::SERVER_MAPS, dataplane::NAT_MAPS])?;
    let _pins = bpffs::PinGuard(Some(pin_dir.clone()));
    for dev in &args.devs {
        for &direction in &directions {
            let program = match direction {
                Direction::Ingress => PROG_MONITOR_INGRESS,
                Direction::Egress => PROG_MONITOR_EGRESS,
            };
            dataplane::tc::attach_pinned(&mut ebpf, program, dev, direction, &pin_dir)?;
        }
    }
    let monitor = Arc::new(Monitor {
        instance: instance.clone(),
        ebpf: Mutex::new(ebpf),
        devs: args.devs.clone(),
        directions: directions.clone(),
        started: Instant::now(),
    });
    let daemon = crate::daemon::Daemon::start(&instance, monitor, metrics).await?;
    info!(
        instance = instance.name(),
        "counting packets on {} ({}); socket {}, pins {}",
        args.devs.join(", "),
        directions
            .iter()
            .map(|d| d.as_str())
            .collect::<Vec<_>>()
            .join("+"),
        daemon.socket().display(),
        pin_dir.display()
    );
    daemon
        .run(std::future::pending(), "detaching and removing pins")
        .await;
    Ok(())
}

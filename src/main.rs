//! The `qmigrate` binary: argument parsing, tracing set-up, progress display, error printing and exit codes.
//! Everything else lives in the library.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use qmigrate::exit::Exit;
use qmigrate::migrate::{self, Destination, MigrationRequest, Progress, Takeover};
use qmigrate::report::MigrationReport;
use tokio_util::sync::CancellationToken;

mod cli;

fn main() -> std::process::ExitCode {
    let args = cli::Cli::parse();
    let filter = match args.verbose {
        // Log lines would be drawn over top's screen.
        0 if matches!(args.command, cli::Command::Top(_)) => "off",
        0 => "warn",
        1 => "qmigrate=info,warn",
        2 => "qmigrate=debug,info",
        _ => "trace",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("QMIGRATE_LOG")
                .unwrap_or_else(|_| filter.into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            return fail(
                &anyhow::Error::new(e).context("cannot start the async runtime"),
                Exit::Internal,
            )
            .into()
        }
    };
    runtime.block_on(run(args.command)).into()
}

async fn run(command: cli::Command) -> Exit {
    match command {
        cli::Command::Migrate(a) if a.vm.is_some() => {
            let req = match inventory_request(&a).await {
                Ok(r) => r,
                Err((e, code)) => return fail(&e, code),
            };
            run_migration(&req, a.tuning.json, a.observe.timeline.as_deref()).await
        }
        cli::Command::Migrate(a) => {
            let req = match migrate_request(&a) {
                Ok(r) => r,
                Err(e) => return fail(&e, Exit::Usage),
            };
            run_migration(&req, a.tuning.json, a.observe.timeline.as_deref()).await
        }
        cli::Command::Recover(a) => {
            let req = match takeover_request(&a.from, &a.to, a.uri.as_deref(), Takeover::Recover)
                .and_then(|mut r| {
                    r.recover_for = qmigrate::config::duration("recover-for", &a.recover_for)?;
                    Ok(r)
                }) {
                Ok(r) => r,
                Err(e) => return fail(&e, Exit::Usage),
            };
            run_migration(&req, a.json, None).await
        }
        cli::Command::Cancel(a) => {
            let req = match takeover_request(&a.from, &a.to, None, Takeover::Cancel) {
                Ok(r) => r,
                Err(e) => return fail(&e, Exit::Usage),
            };
            run_migration(&req, a.json, None).await
        }
        cli::Command::Demo(a) => demo(&a).await,
        cli::Command::Simulate(s) => {
            match qmigrate::plan::run_simulate_command(&s.scenario, &s.policy, s.rounds, s.json) {
                Ok(out) => {
                    print!("{out}");
                    Exit::Completed
                }
                Err(e) => fail(&anyhow::Error::new(e), Exit::Usage),
            }
        }
        cli::Command::Stats(a) => stats(&a).await,
        cli::Command::Top(a) => top(&a).await,
        cli::Command::Serve(a) => serve(&a).await,
        cli::Command::DirtyRate(a) => dirty_rate(&a).await,
        cli::Command::Inventory(cli::InventoryCommand::Check(a)) => inventory_check(&a).await,
        cli::Command::Inventory(cli::InventoryCommand::Traffic(a)) => inventory_traffic(&a).await,
        cli::Command::Evacuate(a) => evacuate(&a).await,
        cli::Command::Balance(a) => balance(&a).await,
        cli::Command::Completions(a) => {
            use clap::CommandFactory;
            match qmigrate::manpages::write_completions(
                cli::Cli::command(),
                a.shell,
                &mut std::io::stdout().lock(),
            ) {
                Ok(()) => Exit::Completed,
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Exit::Completed,
                Err(e) => fail(
                    &anyhow::Error::new(e).context("cannot write the completion script"),
                    Exit::Internal,
                ),
            }
        }
        cli::Command::Man(a) => {
            use clap::CommandFactory;
            match qmigrate::manpages::write_man_pages(&cli::Cli::command(), &a.out) {
                Ok(pages) => {
                    eprintln!("wrote {} man pages to {}", pages.len(), a.out.display());
                    Exit::Completed
                }
                Err(e) => fail(
                    &anyhow::Error::new(e)
                        .context(format!("cannot write man pages to {}", a.out.display())),
                    Exit::Usage,
                ),
            }
        }
    }
}

/// One sampled snapshot: exit 0 when at least one VM answered, 3 (endpoint) when none did.
async fn stats(a: &cli::StatsArgs) -> Exit {
    let opts = match sample_options(
        &a.sample.interval,
        &a.sample.command_timeout,
        a.sample.no_dirty_rate,
    ) {
        Ok(o) => o,
        Err(e) => return fail(&e, Exit::Usage),
    };
    let snapshot = qmigrate::stats::sample_round(&a.sample.sockets, &opts).await;
    if a.json {
        match serde_json::to_string_pretty(&snapshot) {
            Ok(s) => println!("{s}"),
            Err(e) => return fail(&anyhow::Error::new(e), Exit::Internal),
        }
    } else {
        print!("{}", snapshot.to_table());
    }
    for vm in snapshot.vms.iter().filter(|v| v.sample.is_none()) {
        eprintln!("error: {}", vm.error.as_deref().unwrap_or(&vm.socket));
    }
    if snapshot.answered() > 0 {
        Exit::Completed
    } else {
        Exit::Endpoint
    }
}

/// Validated sampling settings from the raw `--interval`, `--command-timeout` and `--no-dirty-rate`.
fn sample_options(
    interval: &str,
    command_timeout: &str,
    no_dirty_rate: bool,
) -> anyhow::Result<qmigrate::stats::SampleOptions> {
    use qmigrate::config;
    let interval = config::duration("interval", interval)?;
    if interval.is_zero() {
        anyhow::bail!("--interval must be more than zero");
    }
    let mut opts = qmigrate::stats::SampleOptions::new(interval);
    opts.command_timeout = config::duration("command-timeout", command_timeout)?;
    opts.vm_timeout = interval.max(Duration::from_secs(1)) + opts.command_timeout * 2;
    opts.dirty_rate = !no_dirty_rate;
    Ok(opts)
}

/// The live view, until q.
async fn top(a: &cli::TopArgs) -> Exit {
    let opts = match sample_options(
        &a.sample.interval,
        &a.sample.command_timeout,
        a.sample.no_dirty_rate,
    ) {
        Ok(o) => o,
        Err(e) => return fail(&e, Exit::Usage),
    };
    match qmigrate::top::run(a.sample.sockets.clone(), opts).await {
        Ok(()) => Exit::Completed,
        Err(e) => fail(&anyhow::Error::new(e), Exit::Usage),
    }
}

/// Serves metrics until SIGINT or SIGTERM; exit 0 after a clean stop.
async fn serve(a: &cli::ServeArgs) -> Exit {
    use qmigrate::stats::serve::{self, ServeOptions, Target};
    let settings = (|| -> anyhow::Result<ServeOptions> {
        if a.max_concurrent == 0 {
            anyhow::bail!("--max-concurrent must be at least 1");
        }
        let sample = sample_options(&a.interval, &a.command_timeout, a.no_dirty_rate)?;
        let mut opts = ServeOptions::new(sample.interval);
        opts.sample = sample;
        opts.max_concurrent_vms = a.max_concurrent;
        Ok(opts)
    })();
    let opts = match settings {
        Ok(o) => o,
        Err(e) => return fail(&e, Exit::Usage),
    };
    let listener = match tokio::net::TcpListener::bind(&a.metrics).await {
        Ok(l) => l,
        Err(source) => {
            let e = serve::ServeError::Bind {
                addr: a.metrics.clone(),
                source,
            };
            return fail(&anyhow::Error::new(e), Exit::Usage);
        }
    };
    let targets = a.sockets.iter().map(|s| Target::parse(s)).collect();
    let cancel = CancellationToken::new();
    let signals = tokio::spawn(cancel_on_signal(
        cancel.clone(),
        "stopping: no more samples, the metrics server closes",
    ));
    let result = serve::run(listener, targets, opts, cancel).await;
    signals.abort();
    match result {
        Ok(()) => Exit::Completed,
        Err(e) => fail(&anyhow::Error::new(e), Exit::Internal),
    }
}

/// One dirty-rate measurement, or a series with --watch; exit 0 when at least one gave a rate, 3 when none did.
async fn dirty_rate(a: &cli::DirtyRateArgs) -> Exit {
    use qmigrate::config;
    use qmigrate::stats::watch::{self, WatchOptions};
    let settings = (|| -> anyhow::Result<WatchOptions> {
        let interval = config::duration("interval", &a.interval)?;
        if interval.is_zero() {
            anyhow::bail!("--interval must be more than zero");
        }
        Ok(WatchOptions {
            interval,
            command_timeout: config::duration("command-timeout", &a.command_timeout)?,
            count: if a.watch { a.count } else { Some(1) },
            window: config::duration("window", &a.window)?,
        })
    })();
    let opts = match settings {
        Ok(o) => o,
        Err(e) => return fail(&e, Exit::Usage),
    };
    let cancel = CancellationToken::new();
    let signals = tokio::spawn(cancel_on_signal(cancel.clone(), "stopping"));
    let json = a.json;
    let measured = watch::watch(&a.socket, &opts, &cancel, |m| match m {
        Ok(m) if json => match serde_json::to_string(m) {
            Ok(line) => println!("{line}"),
            Err(e) => eprintln!("error: {e}"),
        },
        Ok(m) => println!("{}", m.to_line()),
        Err(e) => eprintln!("error: {}", qmigrate::stats::error_chain(e)),
    })
    .await;
    signals.abort();
    if measured > 0 {
        Exit::Completed
    } else {
        Exit::Endpoint
    }
}

fn fail(e: &anyhow::Error, code: Exit) -> Exit {
    eprintln!("error: {e:#}");
    code
}

/// `qmigrate inventory check FILE`: exit 0 when every host and VM answered, 3 when something is wrong.
async fn inventory_check(a: &cli::InventoryCheckArgs) -> Exit {
    let inv = match qmigrate::inventory::Inventory::load(&a.file) {
        Ok(i) => i,
        Err(e) => return fail(&anyhow::Error::new(e), Exit::Usage),
    };
    let report = qmigrate::hosts::check(
        &inv,
        &qmigrate::qmp::ConnectOptions::default(),
        !a.no_classes,
    )
    .await;
    if a.json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => return fail(&anyhow::Error::new(e), Exit::Internal),
        }
    } else {
        print!("{}", report.to_table());
    }
    if report.problems.is_empty() {
        Exit::Completed
    } else {
        Exit::Endpoint
    }
}

async fn inventory_traffic(a: &cli::InventoryTrafficArgs) -> Exit {
    use qmigrate::traffic;
    let window = match qmigrate::config::duration("window", &a.window) {
        Ok(w) if !w.is_zero() && w <= Duration::from_secs(3600) => w,
        Ok(_) => {
            return fail(
                &anyhow::anyhow!(
                    "--window must be more than zero and at most 1h (found {})",
                    a.window
                ),
                Exit::Usage,
            )
        }
        Err(e) => return fail(&anyhow::Error::new(e), Exit::Usage),
    };
    let inv = match qmigrate::inventory::Inventory::load(&a.file) {
        Ok(i) => i,
        Err(e) => return fail(&anyhow::Error::new(e), Exit::Usage),
    };
    let links = qmigrate::remote::links(&inv);
    if a.remove {
        let failed = traffic::remove(&links, qmigrate::remote::COMMAND_TIMEOUT).await;
        for (host, e) in &failed {
            eprintln!("error: host {host}: {}", qmigrate::stats::error_chain(e));
        }
        return if failed.is_empty() {
            Exit::Completed
        } else {
            Exit::Endpoint
        };
    }
    let connect = qmigrate::qmp::ConnectOptions::default();
    let (check, measured) = tokio::join!(
        qmigrate::hosts::check(&inv, &connect, false),
        traffic::measure(&links, window, qmigrate::remote::COMMAND_TIMEOUT)
    );
    let (rates, not_measured) = traffic::gathered(measured);
    let mut problems = check.problems.clone();
    problems.extend(not_measured);
    let matrix = traffic::matrix(&rates, &traffic::vm_macs(&check));
    if a.json {
        let out = serde_json::json!({
            "window_s": window.as_secs_f64(),
            "directed": matrix.directed,
            "flows": matrix.flows,
            "problems": problems,
        });
        match serde_json::to_string_pretty(&out) {
            Ok(s) => println!("{s}"),
            Err(e) => return fail(&anyhow::Error::new(e), Exit::Internal),
        }
    } else {
        print!("{}", traffic::to_table(&matrix, window));
        for p in &problems {
            eprintln!("problem: {p}");
        }
    }
    if problems.is_empty() {
        Exit::Completed
    } else {
        Exit::Endpoint
    }
}

/// What a run of the evacuation executor needs (evacuate, balance): one cancellation token, fired by SIGINT,
/// SIGTERM or SIGHUP (the task that waits for them, to abort once done), and the progress display (nothing for a
/// dry run, bars on a terminal, log lines otherwise).
fn executor_run(
    dry_run: bool,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<()>,
    Box<dyn qmigrate::evacuate::display::Watcher>,
) {
    let cancel = CancellationToken::new();
    let signals = tokio::spawn(cancel_on_signal(
        cancel.clone(),
        "running precopies are cancelled (their VMs stay on their source), postcopies finish, nothing new starts",
    ));
    let watcher: Box<dyn qmigrate::evacuate::display::Watcher> = if dry_run {
        Box::new(qmigrate::evacuate::display::Silent)
    } else if std::io::stderr().is_terminal() {
        Box::new(qmigrate::evacuate::display::Bars::new())
    } else {
        Box::new(qmigrate::evacuate::display::Lines)
    };
    (cancel, signals, watcher)
}

/// `qmigrate evacuate HOST --inventory FILE`: the plan carried out (or printed), the report printed.
async fn evacuate(a: &cli::EvacuateArgs) -> Exit {
    let (inv, opts) = match evacuate_options(a) {
        Ok(x) => x,
        Err(e) => return fail(&e, Exit::Usage),
    };
    let (cancel, signals, watcher) = executor_run(opts.dry_run);
    let result = qmigrate::evacuate::run(&inv, &opts, &cancel, watcher.as_ref()).await;
    drop(watcher);
    signals.abort();
    match result {
        Ok(report) => {
            if a.exec.tuning.json {
                match serde_json::to_string_pretty(&report) {
                    Ok(s) => println!("{s}"),
                    Err(e) => return fail(&anyhow::Error::new(e), Exit::Internal),
                }
            } else {
                print!("{}", report.to_table());
            }
            report.exit()
        }
        Err(e) => {
            let code = e.exit();
            fail(&anyhow::Error::new(e), code)
        }
    }
}

fn evacuate_options(
    a: &cli::EvacuateArgs,
) -> anyhow::Result<(qmigrate::inventory::Inventory, qmigrate::evacuate::Options)> {
    use qmigrate::evacuate::Mode;
    let inv = qmigrate::inventory::Inventory::load(&a.inventory)?;
    inv.host(&a.host)?;
    let mut opts = executor_options(&a.exec, &a.host)?;
    opts.mode = match (a.resume, a.restore) {
        (true, _) => Mode::Resume,
        (_, true) => Mode::Restore,
        _ => Mode::Evacuate,
    };
    opts.only = a.vms.clone();
    opts.dry_run = a.dry_run;
    opts.journal = a
        .exec
        .journal
        .clone()
        .unwrap_or_else(|| qmigrate::evacuate::journal::default_path(&a.host));
    Ok((inv, opts))
}

/// The executor's settings shared by `evacuate` and `balance`: order, limits, budget, journal, TLS, the tuning of
/// every migration and the QMP timeouts. An evacuation of `host` by default; the caller sets the rest.
fn executor_options(
    a: &cli::ExecutorArgs,
    host: &str,
) -> anyhow::Result<qmigrate::evacuate::Options> {
    use qmigrate::evacuate::Mode;
    use qmigrate::plan::evacuate::{Order, OrderMode};
    let order = match a
        .order
        .parse::<OrderMode>()
        .map_err(|e| anyhow::anyhow!("--order: {e}"))?
    {
        OrderMode::Informed => Order::Informed,
        OrderMode::Fifo => Order::Fifo,
        OrderMode::Sjf => Order::Sjf,
        OrderMode::Random => Order::Random { seed: a.seed },
    };
    if a.max_out == 0 || a.max_in == 0 {
        anyhow::bail!("--max-out and --max-in must be at least 1");
    }
    let link_budget = a
        .link_budget
        .as_deref()
        .map(|b| qmigrate::config::rate_bytes_per_s("link-budget", b))
        .transpose()?;
    let mut template = MigrationRequest::new("", Destination::Qmp(String::new()));
    apply_tuning(&mut template, &a.tuning)?;
    let timeout = qmigrate::config::duration("command-timeout", &a.command_timeout)?;
    if timeout.is_zero() {
        anyhow::bail!("--command-timeout must be more than zero");
    }
    let connect = qmigrate::qmp::ConnectOptions {
        handshake_timeout: timeout,
        command_timeout: timeout,
        ..Default::default()
    };
    template.connect = connect.clone();
    Ok(qmigrate::evacuate::Options {
        host: host.to_string(),
        mode: Mode::Evacuate,
        order,
        only: Vec::new(),
        moves: Vec::new(),
        max_out: a.max_out,
        max_in: a.max_in,
        link_budget_bytes_per_s: link_budget,
        journal: a
            .journal
            .clone()
            .unwrap_or_else(qmigrate::evacuate::journal::default_balance_path),
        dry_run: false,
        tls: a.tls,
        template,
        connect,
    })
}

fn balance_options(
    a: &cli::BalanceArgs,
) -> anyhow::Result<(qmigrate::inventory::Inventory, qmigrate::balance::Options)> {
    use qmigrate::config;
    let inv = qmigrate::inventory::Inventory::load(&a.inventory)?;
    let policy: qmigrate::plan::Policy = a.policy.parse()?;
    let every = config::duration("every", &a.every)?;
    if every.is_zero() {
        anyhow::bail!("--every must be more than zero");
    }
    if a.samples == 0 || a.window == 0 {
        anyhow::bail!("--samples and --window must be at least 1");
    }
    if !a.min_gain.is_finite() || a.min_gain < 0.0 {
        anyhow::bail!(
            "--min-gain must be a number of points, 0 or more (found {})",
            a.min_gain
        );
    }
    let traffic_window = config::duration("traffic-window", &a.traffic_window)?;
    let mut tuning = qmigrate::plan::Tuning::default();
    for (flag, value, field) in [
        (
            "--cpu-threshold",
            a.cpu_threshold,
            &mut tuning.cpu_threshold_pct,
        ),
        (
            "--nic-threshold",
            a.nic_threshold,
            &mut tuning.nic_threshold_pct,
        ),
        (
            "--swap-threshold",
            a.swap_threshold,
            &mut tuning.swap_threshold_writes_per_s,
        ),
    ] {
        if let Some(v) = value {
            if !v.is_finite() || v < 0.0 {
                anyhow::bail!("{flag} must be 0 or more (found {v})");
            }
            *field = v;
        }
    }
    if let Some(step) = &a.balloon_step {
        let bytes = config::size_bytes("balloon-step", step)?;
        if bytes < 1 << 20 {
            anyhow::bail!("--balloon-step must be at least 1MiB (found {step})");
        }
        tuning.balloon_step_mib = bytes >> 20;
    }
    let opts = qmigrate::balance::Options {
        policy,
        once: a.once,
        every,
        samples: a.samples,
        window: a.window.max(a.samples),
        tuning,
        guard: qmigrate::balance::guard::Guard {
            vm_cool_down: config::duration("vm-cool-down", &a.vm_cool_down)?,
            host_cool_down: config::duration("host-cool-down", &a.host_cool_down)?,
            min_gain_pct: a.min_gain,
        },
        dry_run: a.dry_run,
        record: a.record.clone(),
        traffic_window: (!traffic_window.is_zero()).then_some(traffic_window),
        executor: executor_options(&a.exec, qmigrate::evacuate::journal::CLUSTER)?,
    };
    Ok((inv, opts))
}

async fn balance(a: &cli::BalanceArgs) -> Exit {
    let (inv, opts) = match balance_options(a) {
        Ok(x) => x,
        Err(e) => return fail(&e, Exit::Usage),
    };
    let (cancel, signals, watcher) = executor_run(false);
    let json = a.exec.tuning.json;
    let mut print = |r: &qmigrate::balance::RoundReport| {
        if json {
            match serde_json::to_string(r) {
                Ok(s) => println!("{s}"),
                Err(e) => eprintln!("error: cannot print the round as JSON: {e}"),
            }
        } else {
            print!("{}", r.to_table());
        }
    };
    let result = qmigrate::balance::run(&inv, &opts, &cancel, watcher.as_ref(), &mut print).await;
    drop(watcher);
    signals.abort();
    match result {
        // A loop stopped by a signal ends well; --once reports its round.
        Ok(reports) => reports
            .last()
            .filter(|_| opts.once)
            .map_or(Exit::Completed, |r| r.exit()),
        Err(e) => {
            let code = match &e {
                qmigrate::balance::BalanceError::Executor(e) => e.exit(),
                qmigrate::balance::BalanceError::NothingSampled { .. } => Exit::Endpoint,
                _ => Exit::Internal,
            };
            fail(&anyhow::Error::new(e), code)
        }
    }
}

/// `qmigrate migrate VM --inventory FILE --to-host HOST`: the VM found by name, the destination started on HOST.
async fn inventory_request(
    a: &cli::MigrateArgs,
) -> Result<MigrationRequest, (anyhow::Error, Exit)> {
    let usage = |e: anyhow::Error| (e, Exit::Usage);
    let (Some(vm), Some(file), Some(to_host)) = (&a.vm, &a.inventory, &a.to_host) else {
        return Err(usage(anyhow::anyhow!(
            "a VM name needs --inventory and --to-host"
        )));
    };
    let inv = qmigrate::inventory::Inventory::load(file).map_err(|e| usage(e.into()))?;
    let target = inv.host(to_host).map_err(|e| usage(e.into()))?.clone();
    // The socket a destination for this VM gets on the target host: a QEMU there is the migration's, not the VM.
    let would_be = qmigrate::migrate::host_qmp_path(&target, vm);
    let found = qmigrate::hosts::find(
        &inv,
        vm,
        &qmigrate::qmp::ConnectOptions::default(),
        Some((&target.name, &would_be)),
    )
    .await
    .map_err(|e| {
        let code = match e {
            qmigrate::hosts::FindError::AlreadyThere { .. }
            | qmigrate::hosts::FindError::Busy { .. } => Exit::State,
            _ => Exit::Endpoint,
        };
        (e.into(), code)
    })?;
    if found.link.host.name == target.name {
        return Err((
            anyhow::anyhow!("VM {vm:?} is already on host {}", target.name),
            Exit::State,
        ));
    }
    let link = std::sync::Arc::new(qmigrate::remote::HostLink::new(target, inv.ssh.clone()));
    let mut req = MigrationRequest::new(
        &found.socket,
        Destination::Host {
            link,
            tls: a.tls,
            vars: inv
                .vms
                .get(&found.name)
                .map(|e| e.vars.clone())
                .unwrap_or_default(),
        },
    );
    req.source_host = Some(found.link.clone());
    req.vm_name = Some(found.name.clone());
    req.uri = a.uri.clone();
    if a.adopt {
        req.takeover = Takeover::Adopt;
    }
    apply_tuning(&mut req, &a.tuning).map_err(usage)?;
    apply_observe(&mut req, &a.observe).map_err(usage)?;
    Ok(req)
}

fn migrate_request(a: &cli::MigrateArgs) -> anyhow::Result<MigrationRequest> {
    let Some(from) = &a.from else {
        anyhow::bail!("give --from, or a VM name with --inventory and --to-host");
    };
    let destination = match (&a.to, a.launch_dst) {
        (Some(to), false) => Destination::Qmp(to.clone()),
        (None, true) => Destination::Launch {
            qmp_path: a.dst_qmp.clone(),
        },
        _ => anyhow::bail!("give exactly one of --to and --launch-dst"),
    };
    let mut req = MigrationRequest::new(from, destination);
    // The URI is checked by migrate::migrate before anything is touched.
    req.uri = a.uri.clone();
    if a.adopt {
        req.takeover = Takeover::Adopt;
    }
    apply_tuning(&mut req, &a.tuning)?;
    apply_observe(&mut req, &a.observe)?;
    Ok(req)
}

/// `recover` and `cancel`: a takeover of the migration under way between two existing QEMUs.
fn takeover_request(
    from: &str,
    to: &str,
    uri: Option<&str>,
    takeover: Takeover,
) -> anyhow::Result<MigrationRequest> {
    let mut req = MigrationRequest::new(from, Destination::Qmp(to.into()));
    req.uri = uri.map(String::from);
    req.takeover = takeover;
    Ok(req)
}

fn apply_tuning(req: &mut MigrationRequest, t: &cli::TuningArgs) -> anyhow::Result<()> {
    use qmigrate::config;
    let l = &mut req.ladder;
    l.downtime = config::duration("downtime", &t.downtime)?;
    l.max_downtime = config::duration("max-downtime", &t.max_downtime)?;
    l.timeout = config::duration("timeout", &t.timeout)?;
    config::downtimes(l.downtime, l.max_downtime)?;
    if l.timeout.is_zero() {
        anyhow::bail!("--timeout must be more than zero");
    }
    l.auto_converge = t.auto_converge;
    l.postcopy = t.postcopy;
    l.on_timeout = t.on_timeout;
    req.bandwidth_bytes_per_s = config::rate_bytes_per_s("bandwidth", &t.bandwidth)?;
    let sample = config::duration("dirty-rate-sample", &t.dirty_rate_sample)?;
    req.dirty_rate_sample = (!sample.is_zero()).then_some(sample);
    req.verify_window = config::duration("verify", &t.verify)?;
    req.recover_for = config::duration("recover-for", &t.recover_for)?;
    if !(1..=99).contains(&t.max_throttle) {
        anyhow::bail!(
            "--max-throttle {}: must be a percentage from 1 to 99",
            t.max_throttle
        );
    }
    l.max_throttle_pct = t.max_throttle;
    req.refuse_hopeless = t.refuse_hopeless;
    req.calibration = if t.no_calibration {
        None
    } else {
        t.calibration
            .clone()
            .or_else(qmigrate::calibrate::default_path)
    };
    Ok(())
}

/// `--probe`, `--probe-netns` and `--timeline`, checked before anything starts.
fn apply_observe(req: &mut MigrationRequest, o: &cli::ObserveArgs) -> anyhow::Result<()> {
    if let Some(target) = &o.probe {
        let target: qmigrate::probe::Target = target
            .parse()
            .map_err(|e| anyhow::anyhow!("--probe {target}: {e}"))?;
        let netns = o.probe_netns.as_ref().map(|n| {
            if n.contains('/') {
                std::path::PathBuf::from(n)
            } else {
                std::path::Path::new("/run/netns").join(n)
            }
        });
        if let Some(ns) = &netns {
            if !ns.exists() {
                anyhow::bail!("--probe-netns {}: no such network namespace", ns.display());
            }
        }
        req.probe = Some(qmigrate::probe::ProbeSettings {
            netns,
            ..qmigrate::probe::ProbeSettings::new(target)
        });
    }
    if let Some(path) = &o.timeline {
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        if dir.is_some_and(|d| !d.is_dir()) {
            anyhow::bail!(
                "--timeline {}: the directory does not exist",
                path.display()
            );
        }
    }
    Ok(())
}

/// Writes `--timeline` once the report is in; a failure is said and does not change the exit status.
fn write_timeline(report: &MigrationReport, path: Option<&std::path::Path>) {
    if let Some(path) = path {
        if let Err(e) = qmigrate::timeline::write(path, report) {
            eprintln!("warning: {e}");
        }
    }
}

/// Runs one migration and prints its report.
async fn run_migration(
    req: &MigrationRequest,
    json: bool,
    timeline: Option<&std::path::Path>,
) -> Exit {
    match migrate_with_progress(req).await {
        Ok(report) => {
            write_timeline(&report, timeline);
            print_report(&report, json)
        }
        Err(e) => {
            let code = e.exit();
            fail(&anyhow::Error::new(e), code)
        }
    }
}

/// Runs one migration with a progress bar on a terminal and SIGINT/SIGTERM cancelling it.
async fn migrate_with_progress(
    req: &MigrationRequest,
) -> Result<MigrationReport, migrate::MigrateError> {
    let cancel = CancellationToken::new();
    let signals = tokio::spawn(cancel_on_signal(
        cancel.clone(),
        "a precopy is cancelled and the source keeps running; a postcopy cannot be cancelled and finishes",
    ));
    let bar = std::io::stderr().is_terminal().then(progress_bar);
    let on_progress = |p: &Progress| {
        if let Some(bar) = &bar {
            qmigrate::evacuate::display::show(bar, p);
        }
    };
    let result = migrate::migrate(req, &cancel, &on_progress).await;
    signals.abort();
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    result
}

fn print_report(report: &MigrationReport, json: bool) -> Exit {
    if json {
        match serde_json::to_string_pretty(report) {
            Ok(s) => println!("{s}"),
            Err(e) => return fail(&anyhow::Error::new(e), Exit::Internal),
        }
    } else {
        print!("{}", report.to_table());
    }
    report.exit()
}

fn progress_bar() -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(1);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {bytes}/{total_bytes} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

async fn cancel_on_signal(cancel: CancellationToken, message: &'static str) {
    use tokio::signal::unix::{signal, SignalKind};
    // SIGHUP too: a closed terminal must cancel (and clean up) like Ctrl-C, not kill us mid-migration.
    let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        return;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
        _ = hup.recv() => {}
    }
    eprintln!("interrupted: {message}");
    cancel.cancel();
}

async fn demo(a: &cli::DemoArgs) -> Exit {
    // Bad arguments are refused before any guest starts.
    let checked = (|| -> anyhow::Result<()> {
        let mut probe = MigrationRequest::new("", Destination::Launch { qmp_path: None });
        apply_tuning(&mut probe, &a.tuning)?;
        apply_observe(&mut probe, &a.observe)?;
        if a.memory_mib < 64 {
            anyhow::bail!(
                "--memory-mib {}: the guest needs at least 64 MiB",
                a.memory_mib
            );
        }
        check_workload(&a.workload)
    })();
    if let Err(e) = checked {
        return fail(&e, Exit::Usage);
    }
    match demo_inner(a).await {
        Ok(code) => code,
        Err(e) => fail(&e, Exit::Internal),
    }
}

/// The guest image's workloads: idle, cpu, dirty:MiB[:MiB/s], web, netrecv, disk.
fn check_workload(w: &str) -> anyhow::Result<()> {
    let ok = match w.split(':').collect::<Vec<_>>().as_slice() {
        ["idle" | "cpu" | "web" | "netrecv" | "disk"] => true,
        ["dirty", mib] => mib.parse::<u32>().is_ok_and(|m| m > 0),
        ["dirty", mib, rate] => {
            mib.parse::<u32>().is_ok_and(|m| m > 0) && rate.parse::<u32>().is_ok()
        }
        _ => false,
    };
    if !ok {
        anyhow::bail!(
            "--workload {:?}: not a workload; use idle, cpu, dirty:MiB[:MiB/s], web, netrecv or disk",
            qmigrate::text::printable(w)
        );
    }
    Ok(())
}

async fn demo_inner(a: &cli::DemoArgs) -> anyhow::Result<Exit> {
    use qmigrate::testbed::{Guest, GuestSpec};
    // A private directory of our own (mode 0700, a fresh name), never a guessable path another user could plant.
    use std::os::unix::fs::PermissionsExt;
    let run_dir = tempfile::Builder::new()
        .prefix("qmigrate-demo-")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir()
        .context("cannot create the demo's directory")?;
    let mut spec = GuestSpec::new("demo-vm", &a.workload, &a.guest_dir, run_dir.path());
    spec.memory_mib = a.memory_mib;
    spec.accel = a.accel.clone();
    spec.qemu = a.qemu.clone();
    eprintln!(
        "starting the source guest ({} MiB, workload {}, {})",
        a.memory_mib, a.workload, a.accel
    );
    let mut source = Guest::launch(spec)
        .await
        .context("cannot start the source guest")?;
    source.wait_ready(Duration::from_secs(60)).await?;
    eprintln!(
        "source QEMU pid {} ready; migrating to a destination launched from its command line",
        source.pid()
    );
    let mut req = MigrationRequest::new(
        &source.qmp_path().display().to_string(),
        Destination::Launch { qmp_path: None },
    );
    apply_tuning(&mut req, &a.tuning)?;
    apply_observe(&mut req, &a.observe)?;
    let result = migrate_with_progress(&req).await;
    let code = match result {
        Ok(report) => {
            write_timeline(&report, a.observe.timeline.as_deref());
            let code = print_report(&report, a.tuning.json);
            if let Some(pid) = report.destination_pid {
                // The demo owns both QEMUs: end the destination it launched too.
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            code
        }
        Err(e) => {
            let code = e.exit();
            fail(&anyhow::Error::new(e), code)
        }
    };
    drop(source);
    drop(run_dir);
    Ok(code)
}

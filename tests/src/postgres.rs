//! A throwaway PostgreSQL cluster from Debian's packages for the shared lease store tests:
//! `initdb` into a directory of the lab, the server run as the `postgres` user on a unix
//! socket only (no TCP port: namespaces share the filesystem, so every concentrator reaches
//! it), stopped and removed on drop. Never a mock.
use std::{
    fs,
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// How long the server gets to start or stop.
const LIMIT: Duration = Duration::from_secs(30);

pub struct Postgres {
    bin: PathBuf,
    dir: PathBuf,
    uid: u32,
    gid: u32,
    child: Option<Child>,
}

/// The directory with initdb and postgres: the newest /usr/lib/postgresql/<v>/bin, else
/// whatever PATH has.
fn bindir() -> Result<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .find(|d| d.join("initdb").exists() && d.join("postgres").exists())
        .context("no PostgreSQL server (initdb): run `cargo xtask setup` (Debian: postgresql)")
}

/// The uid and gid of the `postgres` user (the server refuses to run as root).
fn postgres_user() -> Result<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd")?;
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&"postgres") && f.len() > 3)
                .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
                .flatten()
        })
        .context("no `postgres` user: install Debian's postgresql package (cargo xtask setup)")
}

impl Postgres {
    /// A new cluster in `<dir>/pg`, started.
    pub fn start(dir: &Path) -> Result<Postgres> {
        let bin = bindir()?;
        let (uid, gid) = postgres_user()?;
        let dir = dir.join("pg");
        fs::create_dir_all(&dir)?;
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
        // The lab's directory must be passable for the postgres user.
        if let Some(parent) = dir.parent() {
            let mode = fs::metadata(parent)?.permissions().mode();
            fs::set_permissions(parent, fs::Permissions::from_mode(mode | 0o711))?;
        }
        let mut pg = Postgres {
            bin,
            dir,
            uid,
            gid,
            child: None,
        };
        let out = pg
            .command("initdb")
            .args(["-D"])
            .arg(pg.data())
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
            .output()?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        pg.run()?;
        Ok(pg)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(self.bin.join(program));
        c.uid(self.uid).gid(self.gid).current_dir(&self.dir);
        c
    }

    /// The `--lease-store` URL (unix socket, trust authentication).
    pub fn url(&self) -> String {
        format!(
            "postgresql:///postgres?host={}&user=postgres",
            self.dir.display()
        )
    }

    /// Starts the server and waits (bounded) until it accepts connections.
    pub fn run(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("PostgreSQL is running already");
        }
        let log = fs::File::create(self.dir.join("server.log"))?;
        std::os::unix::fs::chown(self.dir.join("server.log"), Some(self.uid), Some(self.gid))?;
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(self.data())
            .arg("-k")
            .arg(&self.dir)
            .args(["-c", "listen_addresses=", "-c", "fsync=off"])
            .args(["-c", "synchronous_commit=off", "-c", "full_page_writes=off"])
            .args(["-c", "max_connections=50"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting postgres")?;
        self.child = Some(child);
        let deadline = Instant::now() + LIMIT;
        loop {
            let ready = self
                .command("pg_isready")
                .arg("-h")
                .arg(&self.dir)
                .args(["-U", "postgres", "-q"])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                self.child = None;
                bail!("postgres exited ({status}): {}", self.log());
            }
            if Instant::now() > deadline {
                bail!("postgres not ready within {LIMIT:?}: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server (fast shutdown: sessions are cut) and waits for it to exit.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + LIMIT;
        while Instant::now() < deadline {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        Ok(())
    }

    /// The server's log.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// Runs SQL with psql and returns its unaligned, tuples-only output.
    pub fn query(&self, sql: &str) -> Result<String> {
        let out = self
            .command("psql")
            .arg("-h")
            .arg(&self.dir)
            .args(["-U", "postgres", "-d", "postgres", "-X", "-q", "-A", "-t"])
            .args(["-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()?;
        if !out.status.success() {
            bail!("psql {sql:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.stop();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

//! Control-plane scale (placeholder until the load generator lands).
use anyhow::Result;

use crate::{Plan, report::Report};

pub fn run(_plan: &Plan, _report: &mut Report) -> Result<()> {
    Ok(())
}

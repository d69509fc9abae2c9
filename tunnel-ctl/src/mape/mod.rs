//! MAP-E (RFC 7597, SPEC §6). So far: the rule calculator (`tunnel-ctl mape calc`).
pub mod profiles;
pub mod rule;

use anyhow::{Result, anyhow, bail};

use crate::cli::MapeCalcArgs;
use rule::{InterfaceId, Mapping, Rule};

/// `tunnel-ctl mape calc`.
pub fn calc(args: &MapeCalcArgs) -> Result<Mapping> {
    let mapping = match (&args.profile, &args.rule_ipv6, &args.rule_ipv4, args.ea_len) {
        (Some(name), None, None, None) => profiles::Profile::by_name(name)
            .ok_or_else(|| {
                anyhow!(
                    "unknown profile {name:?} (known: {})",
                    profiles::names().join(", ")
                )
            })?
            .map(&args.prefix),
        (None, Some(ipv6), Some(ipv4), Some(ea_len)) => Rule {
            ipv6: *ipv6,
            ipv4: *ipv4,
            ea_len,
            psid_offset: args.psid_offset.unwrap_or(6),
            br: args.br,
            interface_id: args.interface_id.unwrap_or(InterfaceId::Rfc7597),
        }
        .map(&args.prefix),
        (Some(_), ..) => bail!("give either --profile or the rule flags, not both"),
        _ => bail!(
            "give --profile NAME, or all of --rule-ipv6, --rule-ipv4 and --ea-len for a custom rule"
        ),
    };
    let mut mapping = mapping.map_err(|e| anyhow!("{e}"))?;
    if let (Some(layout), Some(_)) = (args.interface_id, &args.profile) {
        mapping.ce_ipv6 = rule::ce_address(&args.prefix, mapping.ipv4, mapping.psid, layout);
    }
    Ok(mapping)
}

//! The tunnel's eBPF object. Every program here only looks things up and rewrites or counts
//! packets; all state is created by the controller.
#![no_std]
#![no_main]

mod bench;
mod br;
mod ce;
mod client;
mod monitor;
mod resolve;
mod server;
mod server_xdp;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

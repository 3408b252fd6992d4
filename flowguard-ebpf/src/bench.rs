//! Programs for `cargo xtask bench`, never attached: baselines and the fix
//! path measured on its own. Built with the `bench` feature (the default);
//! the routers' objects (`cargo xtask dist`) leave them out.

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

use crate::{
    frame::{self, Frame},
    tc_guard, tc_set_dst, xdp_guard,
};

/// Baselines for `cargo xtask bench`: the cost of running any program at
/// all. Never attached.
#[xdp]
pub fn bench_empty_xdp(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[classifier]
pub fn bench_empty_tc(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

/// For `cargo xtask bench`: the guard in fix mode on a stale frame, whose
/// stale MAC is then put back so that every repeat of BPF_PROG_TEST_RUN
/// (which reuses one buffer) takes the stale path and rewrites. The
/// bench subtracts `bench_back_*`, the putting back alone. Never attached.
#[xdp]
pub fn bench_fix_xdp(ctx: XdpContext) -> u32 {
    if let Some(stale) = dst_mac_volatile(&ctx) {
        xdp_guard(&ctx);
        xdp_put_back(&ctx, stale);
    }
    xdp_action::XDP_PASS
}

#[xdp]
pub fn bench_back_xdp(ctx: XdpContext) -> u32 {
    if let Some(stale) = dst_mac_volatile(&ctx) {
        xdp_put_back(&ctx, stale);
    }
    xdp_action::XDP_PASS
}

#[classifier]
pub fn bench_fix_tc(ctx: TcContext) -> i32 {
    if let Some(stale) = dst_mac_volatile(&ctx) {
        tc_guard(&ctx);
        tc_set_dst(&ctx, stale);
    }
    TC_ACT_OK
}

#[classifier]
pub fn bench_back_tc(ctx: TcContext) -> i32 {
    if let Some(stale) = dst_mac_volatile(&ctx) {
        tc_set_dst(&ctx, stale);
    }
    TC_ACT_OK
}

/// The frame's destination MAC, read so that writing it back is never
/// optimised away.
#[inline(always)]
fn dst_mac_volatile(f: &impl Frame) -> Option<[u8; 6]> {
    let p = frame::ptr_at::<[u8; 6]>(f, frame::ETH_DST)?;
    // SAFETY: ptr_at checked that the six bytes are inside the frame.
    Some(unsafe { p.read_volatile() })
}

/// Writes the destination MAC back (XDP) with a store the compiler keeps.
#[inline(always)]
fn xdp_put_back(ctx: &XdpContext, mac: [u8; 6]) {
    if let Some(p) = frame::ptr_at::<[u8; 6]>(ctx, frame::ETH_DST) {
        // SAFETY: ptr_at checked that the six bytes are inside the frame.
        unsafe { (p as *mut [u8; 6]).write_volatile(mac) };
    }
}

use super::*;

const MIB: u64 = 1024 * 1024;

fn settings() -> H2Settings {
    H2Settings::default()
}

fn budget(total: u64, per_client: u64) -> Arc<ReceiveBudget> {
    ReceiveBudget::new(BudgetLimits { total, per_client })
}

fn join(budget: &Arc<ReceiveBudget>) -> (ReceiveWindow, H2Window) {
    ReceiveWindow::h2(&settings(), budget)
}

#[test]
fn steps_round_down_and_never_below_the_floor() {
    let mut last = 0;
    for bytes in (0..64 * MIB).step_by(4093) {
        let step = step_down(bytes);
        assert!(step >= FLOOR);
        assert!(bytes < FLOOR || step <= bytes, "{step} > {bytes}");
        assert!(step >= last, "not monotonic at {bytes}");
        last = step;
    }
    assert_eq!(step_down(8 * MIB), 8 * MIB);
    // Four steps per doubling.
    let distinct: std::collections::BTreeSet<u64> =
        (MIB..2 * MIB).step_by(1024).map(step_down).collect();
    assert_eq!(distinct.len(), 4, "{distinct:?}");
}

#[tokio::test]
async fn one_connection_gets_its_configured_window_at_once() {
    let budget = budget(256 * MIB, 32 * MIB);
    let (window, mut h2) = join(&budget);
    let configured = settings().connection_window;
    assert_eq!(window.window(), u64::from(configured));
    // The task applies the first value even though it equals the builder's.
    assert_eq!(h2.next().await, configured);
    assert_eq!(budget.stats().connections, 1);
    drop(window);
    assert_eq!(budget.stats().connections, 0);
}

#[test]
fn windows_shrink_as_connections_join_and_grow_back_as_they_leave() {
    let total = 64 * MIB;
    let budget = budget(total, total);
    let configured = u64::from(settings().connection_window); // 32 MiB
    let mut held = Vec::new();
    for n in 1..=200u64 {
        held.push(join(&budget));
        let stats = budget.stats();
        assert_eq!(stats.connections, n);
        assert!(
            stats.windows <= total,
            "{n} connections advertise {} > {total}",
            stats.windows
        );
        for (w, _) in &held {
            assert!(w.window() >= FLOOR);
            assert!(w.window() <= configured);
            assert_eq!(w.window(), stats.share.min(configured), "all share alike");
        }
    }
    // 200 connections of a 64 MiB budget: a step at or below 320 KiB.
    assert!(budget.stats().share <= total / 200);
    held.truncate(1);
    assert_eq!(held[0].0.window(), configured, "back to the full window");
}

#[test]
fn past_budget_over_floor_every_connection_keeps_the_floor() {
    let budget = budget(4 * FLOOR, 4 * FLOOR);
    let held: Vec<_> = (0..10).map(|_| join(&budget)).collect();
    for (w, _) in &held {
        assert_eq!(w.window(), FLOOR);
    }
    assert_eq!(budget.stats().windows, 10 * FLOOR);
}

#[test]
fn stall_credit_widens_one_window_and_comes_out_of_every_share() {
    let total = 64 * MIB;
    let budget = budget(total, total);
    let per = u64::from(settings().stream_window); // 1 MiB
    let (a, _wa) = join(&budget);
    let (b, _wb) = join(&budget);
    let share_before = budget.stats().share;
    assert_eq!(b.window(), share_before);
    let guards: Vec<_> = (0..8).map(|_| a.stall(None)).collect();
    assert!(guards.iter().all(StallGuard::is_lent));
    assert_eq!(a.stalled_streams(), 8);
    let stats = budget.stats();
    assert_eq!(stats.lent, 8 * per);
    assert!(stats.share < share_before, "lending shrinks the shares");
    assert_eq!(a.window(), stats.share + 8 * per);
    assert_eq!(b.window(), stats.share);
    assert!(stats.windows <= total);
    drop(guards);
    assert_eq!(budget.lent(), 0);
    assert_eq!(a.stalled_streams(), 0);
    assert_eq!(a.window(), share_before);
    assert_eq!(b.window(), share_before);
}

#[test]
fn lending_stops_at_each_limit_and_counts_why() {
    let per = u64::from(settings().stream_window);
    // Per connection: a quarter of 64 streams' worth is 16.
    let budget = budget(64 * per, 64 * per);
    let (a, _w) = join(&budget);
    let held: Vec<_> = (0..16).map(|_| a.stall(None)).collect();
    assert!(held.iter().all(StallGuard::is_lent));
    assert!(!a.stall(None).is_lent());
    assert_eq!(budget.refused(Refusal::Connection), 1);

    // Per process: three quarters, 48 streams.
    let others: Vec<_> = (0..3).map(|_| join(&budget)).collect();
    let mut lent: Vec<_> = others
        .iter()
        .flat_map(|(w, _)| (0..16).map(|_| w.stall(None)).collect::<Vec<_>>())
        .filter(StallGuard::is_lent)
        .collect();
    assert_eq!(lent.len(), 32);
    assert_eq!(budget.refused(Refusal::Process), 16);
    assert_eq!(budget.lent(), 48 * per);
    lent.clear();
    drop(held);
    assert_eq!(budget.lent(), 0);
}

#[test]
fn one_client_cannot_take_more_than_its_part_across_connections() {
    let per = u64::from(settings().stream_window);
    let budget = budget(256 * per, 4 * per);
    let conns: Vec<_> = (0..4).map(|_| join(&budget)).collect();
    let greedy: IpAddr = "198.18.0.7".parse().unwrap();
    let guards: Vec<_> = conns
        .iter()
        .flat_map(|(w, _)| [w.stall(Some(greedy)), w.stall(Some(greedy))])
        .collect();
    assert_eq!(guards.iter().filter(|g| g.is_lent()).count(), 4);
    assert_eq!(budget.refused(Refusal::Client), 4);
    // Another client, and one in the same IPv6 /64 counted as one.
    let other: IpAddr = "198.18.0.8".parse().unwrap();
    assert!(conns[0].0.stall(Some(other)).is_lent());
    let v6a: IpAddr = "2001:db8::1".parse().unwrap();
    let v6b: IpAddr = "2001:db8::2".parse().unwrap();
    let v6: Vec<_> = (0..4).map(|_| conns[1].0.stall(Some(v6a))).collect();
    assert!(v6.iter().all(StallGuard::is_lent));
    assert!(!conns[2].0.stall(Some(v6b)).is_lent());
    drop(guards);
    assert!(conns[3].0.stall(Some(greedy)).is_lent(), "given back");
}

#[test]
fn the_budget_forgets_connections_and_clients_when_they_go() {
    let budget = budget(64 * MIB, 8 * MIB);
    let client: IpAddr = "198.18.0.9".parse().unwrap();
    let (w, h2) = join(&budget);
    let guard = w.stall(Some(client));
    assert!(guard.is_lent());
    // The relay's guard outlives the connection's other handles.
    drop((w, h2));
    assert_eq!(budget.stats().connections, 1);
    drop(guard);
    let stats = budget.stats();
    assert_eq!((stats.connections, stats.lent, stats.windows), (0, 0, 0));
    assert!(budget.lock().clients.is_empty());
}

-- The shared lease store of several concentrators (`server --lease-store postgres://...`).
-- Applied once, in order, by the first concentrator that starts (tunnel_schema records it).

-- One row per pool address, inserted by every concentrator that serves it. `node` is the
-- concentrator holding the lease (NULL: free); `client` is who holds it, or held it last
-- (a free address stays held for that client for --hold), and `client_key` what makes two
-- connections the same client (the address, or its /64 with --client-key prefix64); `expires` is renewed by the owner
-- well before --timeout, and another concentrator takes the lease over only after it passed.
CREATE TABLE tunnel_leases (
    ipv4     inet PRIMARY KEY,
    client   inet,
    client_key inet,
    node     text,
    mode     text NOT NULL DEFAULT 'inband',
    tunnel   inet,
    since    timestamptz,
    expires  timestamptz,
    released timestamptz
);
CREATE INDEX tunnel_leases_client ON tunnel_leases (client_key);
-- Every lease change rewrites a row's indexed columns: vacuum often, so that index scans do not
-- wade through the dead entries of claims a moment ago.
ALTER TABLE tunnel_leases SET (autovacuum_vacuum_scale_factor = 0.02,
                               autovacuum_vacuum_threshold = 200,
                               autovacuum_analyze_scale_factor = 0.05);
-- Free rows by address: a claim reads the first unlocked one from a random place, so that
-- the rows claimed a moment ago (whose index entries stay until vacuum) are not scanned again
-- by every claim, and two concentrators rarely want the same row. A partial index makes the
-- planner drop `node IS NULL` from the query, so a row re-read after a concurrent claim
-- committed is not checked against it again: tunnel_claim's guarded UPDATE is what decides.
CREATE INDEX tunnel_leases_free ON tunnel_leases (ipv4) WHERE node IS NULL;
CREATE INDEX tunnel_leases_node ON tunnel_leases (node) WHERE node IS NOT NULL;

-- Who held which address when (abuse requests): one row per lease, `ended` NULL while held.
CREATE TABLE tunnel_lease_history (
    id      bigserial PRIMARY KEY,
    ipv4    inet NOT NULL,
    psid    integer,
    client  inet NOT NULL,
    node    text NOT NULL,
    started timestamptz NOT NULL,
    ended   timestamptz
);
CREATE INDEX tunnel_lease_history_ipv4 ON tunnel_lease_history (ipv4, started);

-- Whether `a` is one of the caller's pool addresses.
CREATE FUNCTION tunnel_in_pool(a inet, p_first inet[], p_last inet[], p_exclude inet[])
RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT NOT (a = ANY (p_exclude))
       AND EXISTS (SELECT 1 FROM unnest(p_first, p_last) AS r(f, l) WHERE a BETWEEN r.f AND r.l)
$$;

-- A lease for `p_client` on concentrator `p_node`, in one transaction (one round trip):
--   1. the client's own address (same p_key), if free again (released, or its holder's expiry passed);
--      if another concentrator still holds it: status 'held' (with that node and expiry);
--   2. else a free address nobody held within p_hold seconds, from a random place on;
--   3. else the free address whose hold is oldest;
--   4. else an address of a concentrator that has not renewed for p_reclaim seconds;
--   else status 'exhausted'. Rows other sessions are claiming are skipped (SKIP LOCKED).
-- A lease taken from another concentrator is announced to it (NOTIFY tunnel_lease_lost).
-- The final UPDATE checks the row is still as chosen (another claim may have won it between),
-- else the choice is made again.
CREATE FUNCTION tunnel_claim(p_client inet, p_key inet, p_node text, p_ttl float8, p_hold float8,
                             p_reclaim float8, p_first inet[], p_last inet[],
                             p_exclude inet[])
RETURNS TABLE (status text, addr inet, holder text, until timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    r record;
    tries integer := 0;
    won integer;
    pick inet;
    old_node text;
    held_by text;
    held_addr inet;
    held_until timestamptz;
    i integer;
    total bigint := 0;
    off bigint;
    start inet;
BEGIN
    -- A random address of the pool, every address as likely (ranges weighted by size).
    FOR i IN 1 .. array_length(p_first, 1) LOOP
        total := total + (p_last[i] - p_first[i] + 1);
    END LOOP;
    off := floor(random() * total)::bigint;
    FOR i IN 1 .. array_length(p_first, 1) LOOP
        IF off <= p_last[i] - p_first[i] THEN
            start := p_first[i] + off;
            EXIT;
        END IF;
        off := off - (p_last[i] - p_first[i] + 1);
    END LOOP;
    LOOP
        FOR r IN SELECT l.ipv4, l.node, l.expires FROM tunnel_leases l
                 WHERE l.client_key = p_key AND l.node IS DISTINCT FROM p_node
                   AND tunnel_in_pool(l.ipv4, p_first, p_last, p_exclude)
                 ORDER BY l.node IS NULL DESC, l.released DESC NULLS LAST
                 FOR UPDATE
        LOOP
            IF r.node IS NULL OR r.expires < now() THEN
                pick := r.ipv4;
                old_node := r.node;
                EXIT;
            END IF;
            IF held_by IS NULL THEN
                held_by := r.node;
                held_addr := r.ipv4;
                held_until := r.expires;
            END IF;
        END LOOP;
        IF pick IS NULL AND held_by IS NOT NULL THEN
            RETURN QUERY SELECT 'held'::text, held_addr, held_by, held_until;
            RETURN;
        END IF;
        IF pick IS NULL THEN
            SELECT l.ipv4 INTO pick FROM tunnel_leases l
            WHERE l.node IS NULL AND l.ipv4 >= start
              AND (l.client_key IS NULL OR l.released < now() - make_interval(secs => p_hold))
              AND tunnel_in_pool(l.ipv4, p_first, p_last, p_exclude)
            ORDER BY l.ipv4 LIMIT 1
            FOR UPDATE SKIP LOCKED;
        END IF;
        IF pick IS NULL THEN
            SELECT l.ipv4 INTO pick FROM tunnel_leases l
            WHERE l.node IS NULL AND l.ipv4 < start
              AND (l.client_key IS NULL OR l.released < now() - make_interval(secs => p_hold))
              AND tunnel_in_pool(l.ipv4, p_first, p_last, p_exclude)
            ORDER BY l.ipv4 LIMIT 1
            FOR UPDATE SKIP LOCKED;
        END IF;
        IF pick IS NULL THEN
            SELECT l.ipv4 INTO pick FROM tunnel_leases l
            WHERE l.node IS NULL AND tunnel_in_pool(l.ipv4, p_first, p_last, p_exclude)
            ORDER BY l.released NULLS FIRST, l.ipv4 LIMIT 1
            FOR UPDATE SKIP LOCKED;
        END IF;
        IF pick IS NULL THEN
            SELECT l.ipv4, l.node INTO pick, old_node FROM tunnel_leases l
            WHERE l.node IS NOT NULL AND l.node <> p_node
              AND l.expires < now() - make_interval(secs => p_reclaim)
              AND tunnel_in_pool(l.ipv4, p_first, p_last, p_exclude)
            ORDER BY l.expires LIMIT 1
            FOR UPDATE SKIP LOCKED;
        END IF;
        IF pick IS NULL THEN
            RETURN QUERY SELECT 'exhausted'::text, NULL::inet, NULL::text, NULL::timestamptz;
            RETURN;
        END IF;
        UPDATE tunnel_leases SET client = p_client, client_key = p_key, node = p_node, mode = 'inband', tunnel = NULL,
               since = now(), expires = now() + make_interval(secs => p_ttl), released = NULL
         WHERE ipv4 = pick AND node IS NOT DISTINCT FROM old_node;
        GET DIAGNOSTICS won = ROW_COUNT;
        EXIT WHEN won = 1;
        tries := tries + 1;
        IF tries >= 8 THEN
            RETURN QUERY SELECT 'exhausted'::text, NULL::inet, NULL::text, NULL::timestamptz;
            RETURN;
        END IF;
        pick := NULL;
        old_node := NULL;
        held_by := NULL;
    END LOOP;
    UPDATE tunnel_lease_history SET ended = now() WHERE ipv4 = pick AND ended IS NULL;
    INSERT INTO tunnel_lease_history (ipv4, client, node, started)
         VALUES (pick, p_client, p_node, now());
    IF old_node IS NOT NULL THEN
        PERFORM pg_notify('tunnel_lease_lost', old_node || ' ' || host(pick));
    END IF;
    RETURN QUERY SELECT 'ok'::text, pick, old_node, NULL::timestamptz;
END
$$;

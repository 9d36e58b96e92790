"""Running a spec: `chunks` (work units and packs), `worker` (one pack -> typed store rows), `screening`,
`executors` (local, Ray) and `runner` (prepare each model once, run what the store lacks, analyse)."""

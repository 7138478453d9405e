-- What a job's steps have already been booked into `usage_daily`: a dead-lettered
-- job that an administrator replays ends a second time, and must book only what its
-- steps used since, not its finished steps again.
ALTER TABLE jobs
    ADD COLUMN booked_tokens bigint NOT NULL DEFAULT 0,
    ADD COLUMN booked_cost_micros bigint NOT NULL DEFAULT 0;

-- Jobs that already ended booked all their steps.
UPDATE jobs j
   SET booked_tokens = spent.tokens, booked_cost_micros = spent.cost
  FROM (SELECT job_id,
               coalesce(sum(coalesce(input_tokens, 0) + coalesce(output_tokens, 0)) FILTER (WHERE NOT cached), 0)::bigint
                   AS tokens,
               coalesce(sum(cost_micros), 0)::bigint AS cost
          FROM job_steps GROUP BY job_id) spent
 WHERE spent.job_id = j.id AND j.status IN ('succeeded', 'failed', 'cancelled');

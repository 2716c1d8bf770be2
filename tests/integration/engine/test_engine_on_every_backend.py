"""The engine's unit scenarios, run again on each backend (see conftest.py's `db_url`).

The test functions are the ones in tests/unit; collected here, they take this folder's
parametrized `db_url` fixture, so every guarantee they check holds on PostgreSQL too.
"""

from __future__ import annotations

from tests.unit.test_durability import (  # noqa: F401  # collected by pytest
    test_changed_arity_is_nondeterminism,
    test_changed_step_name_fails_run_with_nondeterminism_error,
    test_committed_step_never_runs_again_after_crash,
    test_crash_before_step_body_runs_every_step_once,
    test_failed_step_reraises_same_error_type_on_replay,
    test_journaled_values_are_stable_across_replay,
    test_step_interrupted_before_commit_runs_again_with_same_key,
)
from tests.unit.test_resilience_engine import (  # noqa: F401
    test_a_failed_run_is_quarantined_and_redrive_continues_it,
    test_a_rate_limiter_on_a_step_keeps_its_bucket_in_the_store,
    test_a_shared_breakers_opening_and_recovery_are_in_the_figures,
    test_redriving_a_run_whose_child_failed_continues_the_child_too,
    test_reliability_figures_come_from_the_store,
    test_retry_wait_is_durable_and_the_attempt_count_survives_a_restart,
    test_run_deadline_is_seen_by_steps_and_ends_the_run,
)
from tests.unit.test_runs import (  # noqa: F401
    test_cancel_is_recorded_and_propagates_to_children,
    test_cancel_of_a_live_run_raises_cancelled_error_inside_it,
    test_child_failure_surfaces_in_parent_as_workflow_failed,
    test_children_results_are_awaited_durably,
    test_fan_out_positions_do_not_depend_on_completion_order,
    test_start_is_idempotent_on_run_id_and_never_runs_twice,
    test_unregistered_version_is_reported_orphaned_not_failed,
)
from tests.unit.test_supervisor import (  # noqa: F401
    test_a_child_that_ignores_its_stop_is_killed_after_its_shutdown_time,
    test_a_nested_supervisor_that_escalates_is_restarted_by_its_parent,
    test_a_tree_resumes_after_a_restart_with_its_restart_count,
    test_intensity_exceeded_stops_the_children_and_escalates,
    test_one_for_all_restarts_every_child_stopping_the_others_in_reverse,
    test_one_for_one_restarts_only_the_child_that_ended,
    test_rest_for_one_restarts_the_child_and_those_started_after_it,
)
from tests.unit.test_waits import (  # noqa: F401
    test_event_wakes_a_parked_run,
    test_events_sent_before_the_wait_are_kept_and_consumed_in_order,
    test_fan_out_of_timers_and_steps_parks_once_everything_waits,
    test_sleeping_run_is_parked_with_no_coroutine_and_fires_on_time,
    test_timer_that_came_due_while_down_fires_at_once_on_start,
    test_wait_survives_restart_and_event_sent_while_down,
    test_wait_timeout_returns_default_after_restart,
)


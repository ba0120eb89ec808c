"""kd_seed_runs.eval_accuracy → best_score: it holds the study's metric at the retraining's best epoch (accuracy,
F1, Pearson...), not accuracy. A rename: every recorded value is kept.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Batch mode: SQLite copies the table into the new shape (rows, index, unique and foreign keys kept);
    # PostgreSQL renames the column in place.
    with op.batch_alter_table("kd_seed_runs") as batch:
        batch.alter_column("eval_accuracy", new_column_name="best_score", existing_type=sa.Double(),
                           existing_nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("kd_seed_runs") as batch:
        batch.alter_column("best_score", new_column_name="eval_accuracy", existing_type=sa.Double(),
                           existing_nullable=False)

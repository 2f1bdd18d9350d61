"""Feature matrices as the models take them: one float32 array from a pandas frame or Arrow data."""

import numpy as np
import pyarrow as pa


def feature_array(data, columns, order: str = "F") -> np.ndarray:
    """``columns`` of a DataFrame, Arrow table or record batch as one float32 matrix, copied column by column: no
    intermediate frame (an Arrow batch through pandas costs more than scoring it). A missing column is a KeyError.

    Column-major by default, like a pandas frame's values: gradient boosting predicts 3x faster from it than from
    row-major. TensorFlow takes row-major (``order="C"``) and copies anything else."""
    X = np.empty((len(data), len(columns)), dtype=np.float32, order=order)
    arrow = isinstance(data, (pa.Table, pa.RecordBatch))
    for j, column in enumerate(columns):
        if arrow:
            X[:, j] = data.column(column).to_numpy(zero_copy_only=False)
        else:
            X[:, j] = data[column].to_numpy(dtype=np.float32, na_value=np.nan)
    return X

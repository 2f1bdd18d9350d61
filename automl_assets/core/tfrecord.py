"""Feature matrices as TFRecord files of ``tf.train.Example``: the input format of SageMaker's TensorFlow containers.

One Example per row: ``features`` (float list, in the order of ``feature_columns``), ``label`` (float; absent in
inference matrices) and ``user_id`` (bytes). TensorFlow is imported inside the functions: it takes seconds to import,
and most callers of this package never need it.
"""

import functools
import os

import numpy as np
import pandas as pd

from automl_assets.core.matrices import feature_array

FEATURES_KEY = "features"
LABEL_KEY = "label"
USER_ID_KEY = "user_id"
# Rows serialised per TensorFlow call: large enough to amortise the call, small enough to keep one chunk's copy small.
WRITE_CHUNK_ROWS = 8192


@functools.cache
def import_tensorflow():
    """TensorFlow with C++ logging quietened and its thread pools sized to the CPUs this process may use."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(len(os.sched_getaffinity(0)))
        tf.config.threading.set_inter_op_parallelism_threads(2)
    except RuntimeError:
        pass  # the host process already started TensorFlow's runtime: its thread settings stand
    return tf


def _encode_examples(tf, columns: dict):
    """Serialise a batch of Examples from ``{key: (list type, values of shape [rows, width])}``.

    TensorFlow's proto encoder handles each level of the message for the whole batch in C++: several times faster
    than building ``tf.train.Example`` objects row by row in Python.
    """
    rows = tf.shape(next(iter(columns.values()))[1])[0]

    def encode(message_type, fields, values, sizes):
        return tf.io.encode_proto(tf.tile([sizes], [rows, 1]), values, fields, f"tensorflow.{message_type}")

    entries = []
    for key, (list_type, values) in columns.items():
        value_list = encode(list_type, ["value"], [values], [values.shape[1]])
        oneof = "float_list" if list_type == "FloatList" else "bytes_list"
        feature = encode("Feature", [oneof], [value_list[:, None]], [1])
        entries.append(encode("Features.FeatureEntry", ["key", "value"], [tf.fill([rows, 1], key), feature[:, None]], [1, 1]))
    features = encode("Features", ["feature"], [tf.stack(entries, axis=1)], [len(entries)])
    return encode("Example", ["features"], [features[:, None]], [1])


def write_tfrecord(df: pd.DataFrame, path, feature_columns: list[str], label_column: str | None = "label") -> None:
    """Write one Example per row of ``df``; ``label_column=None`` for inference matrices (no label)."""
    tf = import_tensorflow()
    signature = [tf.TensorSpec([None, len(feature_columns)], tf.float32), tf.TensorSpec([None], tf.string)]
    if label_column is not None:
        signature.append(tf.TensorSpec([None], tf.float32))

    @tf.function(input_signature=signature)
    def serialise(features, user_id, label=None):
        columns = {FEATURES_KEY: ("FloatList", features), USER_ID_KEY: ("BytesList", user_id[:, None])}
        if label is not None:
            columns[LABEL_KEY] = ("FloatList", label[:, None])
        return _encode_examples(tf, columns)

    with tf.io.TFRecordWriter(str(path)) as writer:
        for start in range(0, len(df), WRITE_CHUNK_ROWS):
            chunk = df.iloc[start : start + WRITE_CHUNK_ROWS]
            # Row-major: a slice of the frame's column-major values is copied by TensorFlow with a cache miss per value.
            tensors = [feature_array(chunk, feature_columns, order="C"), chunk["user_id"].to_numpy(dtype=object)]
            if label_column is not None:
                tensors.append(chunk[label_column].to_numpy(np.float32))
            for record in serialise(*tensors).numpy():
                writer.write(record)


def tfrecord_dataset(
    path,
    n_features: int,
    batch_size: int,
    with_label: bool = True,
    *,
    user_ids=None,
    shuffle_buffer: int = 0,
    seed: int | None = None,
):
    """Stream batches of ``features`` (or ``(features, label)`` with ``with_label``) from TFRecord file(s).

    ``user_ids``: keep only these users' rows (e.g. a training split). ``shuffle_buffer``: shuffle serialised records
    through a buffer of that many before batching.
    """
    tf = import_tensorflow()
    spec = {FEATURES_KEY: tf.io.FixedLenFeature([n_features], tf.float32)}
    if with_label:
        spec[LABEL_KEY] = tf.io.FixedLenFeature([], tf.float32)
    if user_ids is not None:
        spec[USER_ID_KEY] = tf.io.FixedLenFeature([], tf.string)
        keys = tf.constant(np.asarray(user_ids, dtype=object), tf.string)
        wanted = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(keys, tf.ones_like(keys, tf.bool)), default_value=False
        )

    def parse(serialised):
        parsed = tf.io.parse_example(serialised, spec)
        if user_ids is not None:
            keep = wanted.lookup(parsed.pop(USER_ID_KEY))
            parsed = {key: tf.boolean_mask(value, keep) for key, value in parsed.items()}
        return (parsed[FEATURES_KEY], parsed[LABEL_KEY]) if with_label else parsed[FEATURES_KEY]

    dataset = tf.data.TFRecordDataset(path)
    if shuffle_buffer:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size).map(parse, num_parallel_calls=tf.data.AUTOTUNE)
    if user_ids is not None:
        dataset = dataset.rebatch(batch_size)  # filtering thinned the batches: refill them (and drop empty ones)
    return dataset.prefetch(tf.data.AUTOTUNE)

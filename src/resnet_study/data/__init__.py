"""Images in: a data path's files, each held to a size bound (`tree`), the readers (`sources`),
the decoded cache (`store`), the device-resident batches (`loader`) and a run's splits
(`splits`)."""

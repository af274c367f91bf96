"""Images in: the readers (`sources`), the decoded cache (`store`), the device-resident batches
(`loader`) and a run's splits (`splits`)."""

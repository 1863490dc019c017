#!/bin/sh
# As apache/kafka's image does: KAFKA_FOO_BAR=v becomes foo.bar=v; format the log dir once, start.
set -e
props=/tmp/server.properties
env | grep '^KAFKA_' | grep -v -E '^KAFKA_(HEAP_OPTS|OPTS)=' | while IFS='=' read -r key value; do
  echo "$(echo "${key#KAFKA_}" | tr 'A-Z_' 'a-z.')=$value"
done > $props
java -cp '/opt/kafka/libs/*' kafka.tools.StorageTool format -t "$CLUSTER_ID" -c $props --ignore-formatted
exec java -Xms256m -Xmx512m -cp '/opt/kafka/libs/*' kafka.Kafka $props
